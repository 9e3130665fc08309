"""Milliseconds per train step of each mode: scanned loop vs. jitted step from a Python loop.

python experiments/step_time.py --modes=bp,sg,cdni --steps=200
python experiments/step_time.py --model=cnn --steps=5 --repeats=1 --loops=scan   # paper's CNN
"""

from __future__ import annotations

import sys

from absl import app, flags

from sgjax.bench.names import device_label, markdown_row, markdown_table
from sgjax.bench.programs import matmul_gflops, time_host_fed_loop, time_python_loop, time_scanned
from sgjax.cli.errors import fail, make_flags_parser
from sgjax.cli.run import check_fits
from sgjax.data import load_dataset, to_device
from sgjax.data.sources import DataError
from sgjax.training.architecture import config_facts
from sgjax.training.config import DATASETS, MODELS, MODES, ConfigError, TrainConfig

LOOPS = ("scan", "python", "host")

flags.DEFINE_list("modes", ["bp", "sg", "cdni"], "Modes to time.")
flags.DEFINE_integer("steps", 200, "Steps per timed run.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timed runs per variant (median reported).", lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Minibatch size.", lower_bound=1)
flags.DEFINE_integer("sg_hidden_layers", None, "Module depth (default: the mode's).")
flags.DEFINE_integer("sg_hidden_units", 1024, "Module width (MLP).", lower_bound=1)
flags.DEFINE_enum("model", "mlp", MODELS, "mlp: the paper's MLP; cnn: the paper's CNN.")
flags.DEFINE_integer("hidden_layers", 3, "Hidden blocks (MLP) or conv stages (CNN).")
flags.DEFINE_integer("filters", None, "CNN filters (default: the paper's for the dataset).")
flags.DEFINE_integer("kernel_size", 5, "CNN kernel size.")
flags.DEFINE_enum("dataset", "mnist", DATASETS, "Data the batches are drawn from.")
flags.DEFINE_string("data_dir", None, "Where the data is (CIFAR-10: its python-version archive).")
flags.DEFINE_list(
    "loops",
    list(LOOPS),
    "Loops to time: scan (lax.scan on the device), python (jitted step from Python), host "
    "(batches fed from the host); the scanned one is always timed.",
)
FLAGS = flags.FLAGS


def configs_from_flags() -> list[TrainConfig]:
    """One validated configuration per mode of ``--modes``; raises ConfigError (one line)."""
    modes = [m.strip() for m in FLAGS.modes]
    if not modes or any(m not in MODES for m in modes):
        raise ConfigError(f"--modes={','.join(FLAGS.modes)}: choose among {','.join(MODES)}")
    loops = [name.strip() for name in FLAGS.loops]
    if any(name not in LOOPS for name in loops):
        raise ConfigError(f"--loops={','.join(FLAGS.loops)}: choose among {','.join(LOOPS)}")
    return [
        TrainConfig(
            mode=mode,
            model=FLAGS.model,
            batch_size=FLAGS.batch_size,
            hidden_layers=FLAGS.hidden_layers,
            sg_hidden_layers=FLAGS.sg_hidden_layers,
            sg_hidden_units=FLAGS.sg_hidden_units,
            filters=FLAGS.filters,
            kernel_size=FLAGS.kernel_size,
            dataset=FLAGS.dataset,
            data_dir=FLAGS.data_dir,
        )
        for mode in modes
    ]


def main(argv: list[str]) -> int:
    del argv
    try:
        configs = configs_from_flags()
        dataset = load_dataset(FLAGS.dataset, FLAGS.data_dir)
        for config in configs:
            check_fits(config, dataset)
    except (ConfigError, DataError) as error:
        fail(str(error))
    data = to_device(dataset)
    print(f"device: {device_label()}")
    print(f"network: {config_facts(configs[0]).description}; batch {FLAGS.batch_size}")
    matmul = matmul_gflops()
    print(f"float32 matmul: {matmul:.0f} GFLOP/s")
    headers = ["mode", "module", "scanned ms/step", "python-loop ms/step", "loop/scan"]
    headers += ["host-fed loop ms/step", "host-fed/scan", "GFLOP/step", "GFLOP/s (scanned)"]
    print(*markdown_table([*headers, "compile s (scan / step)"]), sep="\n")
    for config in configs:
        mode = config.mode
        loops = {name.strip() for name in FLAGS.loops}
        scanned = time_scanned(config, data, FLAGS.steps, FLAGS.repeats)
        # The FLOP count comes from the single jitted step: time it once if not asked for.
        timed = "python" in loops
        looped = time_python_loop(
            config, data, FLAGS.steps if timed else 1, FLAGS.repeats if timed else 1
        )
        if "host" in loops:
            host_ms = time_host_fed_loop(config, dataset, FLAGS.steps, FLAGS.repeats).ms_per_step
        else:
            host_ms = float("nan")
        loop_ms = looped.ms_per_step if timed else float("nan")
        gflop = looped.flops_per_step / 1e9
        gflops = gflop / scanned.ms_per_step * 1e3
        cells = [mode, config_facts(config).synthesizer, f"{scanned.ms_per_step:.2f}"]
        cells += [f"{loop_ms:.2f}", f"{loop_ms / scanned.ms_per_step:.2f}", f"{host_ms:.2f}"]
        cells += [f"{host_ms / scanned.ms_per_step:.2f}", f"{gflop:.3f}"]
        cells += [f"{gflops:.0f} ({gflops / matmul:.0%} of matmul)"]
        cells += [f"{scanned.compile_s:.1f} / {looped.compile_s:.1f}"]
        print(markdown_row(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=make_flags_parser(FLAGS)))
