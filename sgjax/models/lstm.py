"""The recurrent core of the recurrent-DNI experiments: an LSTM with a linear readout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

LSTMCarry = tuple[jax.Array, jax.Array]
"""The LSTM's state ``(c, h)``: cell and output, each ``[batch, hidden_units]``."""


class LSTMCore(nn.Module):
    """One LSTM layer and a linear readout: ``core(carry, x) -> (carry, logits)`` per time step
    (any Flax module with this signature can replace it in ``sgjax.core.recurrent``)."""

    hidden_units: int
    output_dim: int

    @nn.compact
    def __call__(self, carry: LSTMCarry, x: jax.Array) -> tuple[LSTMCarry, jax.Array]:
        carry, h = nn.OptimizedLSTMCell(self.hidden_units, name="lstm")(carry, x)
        return carry, nn.Dense(self.output_dim, name="readout")(h)


def zero_carry(batch_size: int, hidden_units: int) -> LSTMCarry:
    zeros = jnp.zeros((batch_size, hidden_units), jnp.float32)
    return zeros, zeros
