"""Milliseconds per train step of each mode: scanned loop vs. jitted step from a Python loop.

python experiments/step_time.py --modes=bp,sg,cdni --steps=200
"""

from __future__ import annotations

import sys

from absl import app, flags

from sgjax.bench.report import module_label
from sgjax.bench.timing import matmul_gflops, time_host_fed_loop, time_python_loop, time_scanned
from sgjax.cli.errors import fail, make_flags_parser
from sgjax.cli.run import check_fits
from sgjax.data.device import load_dataset, to_device
from sgjax.data.sources import DataError
from sgjax.training.config import MODES, ConfigError, TrainConfig
from sgjax.training.records import device_info

flags.DEFINE_list("modes", ["bp", "sg", "cdni"], "Modes to time.")
flags.DEFINE_integer("steps", 200, "Steps per timed run.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timed runs per variant (median reported).", lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Minibatch size.", lower_bound=1)
flags.DEFINE_integer("sg_hidden_layers", None, "Module depth (default: the mode's).")
flags.DEFINE_integer("sg_hidden_units", 1024, "Module width.", lower_bound=1)
FLAGS = flags.FLAGS


def configs_from_flags() -> list[TrainConfig]:
    """One validated configuration per mode of ``--modes``; raises ConfigError (one line)."""
    modes = [m.strip() for m in FLAGS.modes]
    if not modes or any(m not in MODES for m in modes):
        raise ConfigError(f"--modes={','.join(FLAGS.modes)}: choose among {','.join(MODES)}")
    return [
        TrainConfig(
            mode=mode,
            batch_size=FLAGS.batch_size,
            sg_hidden_layers=FLAGS.sg_hidden_layers,
            sg_hidden_units=FLAGS.sg_hidden_units,
        )
        for mode in modes
    ]


def main(argv: list[str]) -> int:
    del argv
    try:
        configs = configs_from_flags()
        dataset = load_dataset("mnist", None)
        for config in configs:
            check_fits(config, dataset)
    except (ConfigError, DataError) as error:
        fail(str(error))
    data = to_device(dataset)
    device = device_info()
    print(f"device: {device['platform']} ({device['device_kind']})")
    print(f"float32 matmul: {matmul_gflops():.0f} GFLOP/s")
    header = "| mode | module | scanned ms/step | python-loop ms/step | loop/scan |"
    header += " host-fed loop ms/step | host-fed/scan | GFLOP/step | GFLOP/s (scanned) |"
    header += " compile s (scan / step) |"
    print(header)
    print("|" + "---|" * 10)
    for config in configs:
        mode = config.mode
        scanned = time_scanned(config, data, FLAGS.steps, FLAGS.repeats)
        looped = time_python_loop(config, data, FLAGS.steps, FLAGS.repeats)
        host_fed = time_host_fed_loop(config, dataset, FLAGS.steps, FLAGS.repeats)
        gflop = looped.flops_per_step / 1e9
        print(
            f"| {mode} | {module_label(config)} | {scanned.ms_per_step:.2f} | "
            f"{looped.ms_per_step:.2f} | "
            f"{looped.ms_per_step / scanned.ms_per_step:.2f} | {host_fed.ms_per_step:.2f} | "
            f"{host_fed.ms_per_step / scanned.ms_per_step:.2f} | {gflop:.3f} | "
            f"{gflop / scanned.ms_per_step * 1e3:.0f} | "
            f"{scanned.compile_s:.1f} / {looped.compile_s:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=make_flags_parser(FLAGS)))
