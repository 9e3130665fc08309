"""How far the paper's stale-gradient baseline moves each hidden layer, against bp and zero_grad.

In front of Dense->BatchNorm the batch mean of dLoss/dh is zero but for rounding (BatchNorm
ignores a shift common to the batch), so ``stale_gradient``'s moving average is tiny at every
boundary but the top one. Adam is scale-free, so even rounding could move a layer: this prints
each method's relative change of each hidden layer's kernel, and the averages' largest entry.

Usage: python tools/stale_first_layer.py [--steps 200]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from sgjax.core.layers import HiddenBlock, OutputLayer, accuracy, cross_entropy
from sgjax.core.methods import backprop, stale_gradient, zero_gradient
from sgjax.core.optim import adam
from sgjax.core.trainer import Trainer
from sgjax.data import load_dataset

BATCH, UNITS, LAYERS = 64, 128, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    steps = parser.parse_args().steps
    data = load_dataset("mnist", None)
    count = min(data.train_size, 32 * BATCH)
    x = jnp.asarray(data.train_images[:count].reshape(count, -1) / 255.0, jnp.float32)
    y = jnp.asarray(data.train_labels[:count])
    methods = {"bp": backprop(), "zero_grad": zero_gradient()}
    methods |= {f"stale_grad {d:g}": stale_gradient(d) for d in (0.9, 0.99, 0.9999)}
    for name, method in methods.items():
        stages = [*(HiddenBlock(UNITS) for _ in range(LAYERS)), OutputLayer(10)]
        trainer = Trainer(stages, method, cross_entropy, adam(1e-3), accuracy=accuracy)
        start = trainer.init(jax.random.PRNGKey(0), x[:BATCH])
        step, state = jax.jit(trainer.step), start
        for t in range(steps):
            i = (t * BATCH) % (count - BATCH + 1)
            state, _ = step(state, x[i : i + BATCH], y[i : i + BATCH])
        moved = []
        for before, after in zip(start.stages[:LAYERS], state.stages[:LAYERS], strict=True):
            k0, k = before.params["Dense_0"]["kernel"], after.params["Dense_0"]["kernel"]
            moved.append(f"{float(jnp.linalg.norm(k - k0) / jnp.linalg.norm(k0)):.2e}")
        ema = [
            f"{float(jnp.abs(s.collections.get('stale', 0.0)).max()):.1e}"
            for s in state.synthesizers
        ]
        print(
            f"{name}: kernels moved (relative, layers 1..{LAYERS}) {' '.join(moved)}; "
            f"largest average entry per boundary {' '.join(ema) or '-'}"
        )


if __name__ == "__main__":
    main()
