"""Does DNI learn, or only the output layer? Test accuracy and synthetic-gradient alignment.

  python tools/sg_alignment.py --mode=sg --num_steps=3000 --learning_rate=1e-3 \
      --sg_hidden_layers=1 --sg_hidden_units=256 [--dataset=fashion_mnist] [--sg_warmup_steps=30]

Trains the paper's MLP on the default data with the given method, and the same run with frozen
hidden layers (synthesizers that never learn, so every synthetic gradient stays 0 and only the
output layer trains), printing at 10 points: training loss, test accuracy, and each boundary's
cosine between the synthetic gradient and the true dLoss/dh on a fixed probe batch of 512.
``--sg_warmup_steps``: the first steps train by backprop while the synthesizers fit its gradients;
``--nofrozen_control`` skips the control run.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from sgjax.cli.errors import fail, make_flags_parser
from sgjax.core.trainer import Trainer, TrainerState
from sgjax.data import load_dataset, sample_batch, scale_images, to_device
from sgjax.training.config import ConfigError, TrainConfig
from sgjax.training.model import sample_shape, trainer_for

flags.DEFINE_enum("mode", "sg", ["sg", "cdni"], "Decoupled method to probe.")
flags.DEFINE_integer("num_steps", 3000, "Training steps (a multiple of 10).")
flags.DEFINE_float("learning_rate", 1e-3, "Initial Adam learning rate.")
flags.DEFINE_integer("sg_hidden_layers", 1, "Synthesizer hidden layers.")
flags.DEFINE_integer("sg_hidden_units", 256, "Synthesizer width.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist"], "Dataset (default data).")
flags.DEFINE_integer("sg_warmup_steps", 0, "Steps of backprop that warm the synthesizers up.")
flags.DEFINE_bool("frozen_control", True, "Also run the frozen-hidden-layers control.")
FLAGS = flags.FLAGS
POINTS = 10


def run(trainer: Trainer, config: TrainConfig, label: str) -> None:
    data = to_device(load_dataset(config.dataset, None))
    init_key, data_key = jax.random.split(jax.random.PRNGKey(config.seed))
    state = trainer.init(init_key, jnp.zeros(sample_shape(config)))
    per_point = config.num_steps // POINTS

    @jax.jit
    def chunk(state: TrainerState, start: jax.Array) -> tuple[TrainerState, jax.Array]:
        def body(s: TrainerState, i: jax.Array) -> tuple[TrainerState, jax.Array]:
            batch = sample_batch(jax.random.fold_in(data_key, i), data, config.batch_size)
            s, metrics = trainer.step(s, batch.images, batch.labels, step=i)
            return s, metrics.loss

        return jax.lax.scan(body, state, start + jnp.arange(per_point))

    probe = sample_batch(jax.random.PRNGKey(12345), data, 512)
    test_x, test_y = scale_images(data.test_images), data.test_labels
    evaluate = jax.jit(lambda s: trainer.evaluate(s, test_x, test_y)[1])
    alignment = jax.jit(lambda s: trainer.synthetic_gradient_cosines(s, probe.images, probe.labels))
    for point in range(POINTS):
        state, losses = chunk(state, jnp.asarray(point * per_point))
        cos = " ".join(f"{float(c):+.3f}" for c in alignment(state))
        print(
            f"{label:>6} step {(point + 1) * per_point:>7d} | loss {float(losses.mean()):.4f} | "
            f"test acc {float(evaluate(state)):.4f} | cosine {cos}",
            flush=True,
        )


def main(argv: list[str]) -> int:
    del argv
    try:
        if FLAGS.num_steps % POINTS:
            raise ConfigError(f"--num_steps={FLAGS.num_steps} must be a multiple of {POINTS}")
        config = TrainConfig(
            mode=FLAGS.mode,
            num_steps=FLAGS.num_steps,
            learning_rate=FLAGS.learning_rate,
            sg_hidden_layers=FLAGS.sg_hidden_layers,
            sg_hidden_units=FLAGS.sg_hidden_units,
            seed=FLAGS.seed,
            dataset=FLAGS.dataset,
            sg_warmup_steps=FLAGS.sg_warmup_steps,
        )
    except ConfigError as error:
        fail(str(error))
    trained = trainer_for(config)
    run(trained, config, config.mode)
    if FLAGS.frozen_control:
        run(trained.frozen_control(), config, "frozen")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=make_flags_parser(FLAGS)))
