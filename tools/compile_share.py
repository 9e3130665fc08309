"""CPU seconds to trace, compile and run one of tests/test_cnn.py's floor runs (a 300-step
``lax.scan`` of the tiny CNN), and a checksum of the trained state: how much of a learning
test is compilation, and whether an XLA flag changes the numbers.

  PYTHONPATH=$PWD python tools/compile_share.py cdni 300
  XLA_FLAGS=--xla_backend_optimization_level=0 PYTHONPATH=$PWD \
      python tools/compile_share.py cdni 300
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import test_cnn  # noqa: E402

from sgjax.data import load_dataset, sample_batch, to_device  # noqa: E402
from sgjax.training.config import TrainConfig  # noqa: E402
from sgjax.training.model import sample_shape, trainer_for  # noqa: E402


def main(mode: str, steps: int) -> None:
    config = TrainConfig(mode=mode, seed=0, **(test_cnn.TINY | {"num_steps": steps}))
    trainer = trainer_for(config)
    data = to_device(load_dataset("mnist", None))
    init_key, data_key = jax.random.split(jax.random.PRNGKey(0))
    state = trainer.init(init_key, jnp.zeros(sample_shape(config)))

    def run(state):
        def body(s, i):
            batch = sample_batch(jax.random.fold_in(data_key, i), data, config.batch_size)
            return trainer.step(s, batch.images, batch.labels)[0], None

        return jax.lax.scan(body, state, jnp.arange(config.num_steps))[0]

    t0 = time.process_time()
    lowered = jax.jit(run).lower(state)
    t1 = time.process_time()
    compiled = lowered.compile()
    t2 = time.process_time()
    out = jax.block_until_ready(compiled(state))
    t3 = time.process_time()
    checksum = sum(float(np.sum(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(out))
    print(
        f"{mode} {steps} steps: trace {t1 - t0:.2f} compile {t2 - t1:.2f} run {t3 - t2:.2f} "
        f"CPU s; checksum {checksum!r}"
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
