"""The benchmark: files and columns, vmapped and sharded runs equal separate ones, presets, sweeps.

One tiny benchmark (bp and sg, two hidden blocks of 16 units, 20 steps, 2 seeds x 2 learning
rates in one program per mode) is run once per session (also under pytest-xdist: by the first
worker to need it, ``shared_fixture.computed_once``) and shared by the tests that read its results.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import chex
import jax
import matplotlib.image
import numpy as np
import pytest
from absl import flags
from local_processes import xla_flags
from shared_fixture import computed_once, session_folder

from sgjax.bench.names import Reached
from sgjax.bench.programs import BenchmarkSettings, run_program
from sgjax.bench.report import Row, summary_lines, table_columns
from sgjax.bench.sweep import parse_sweep
from sgjax.cli.benchmark import BenchmarkFiles, define_flags, run, settings_from_flags
from sgjax.data import load_dataset, to_device
from sgjax.training.config import ConfigError, TrainConfig
from sgjax.training.loop import init_train_state

REPO = Path(__file__).resolve().parents[1]
TINY_FLAGS = [
    "--modes=bp,sg",
    "--num_steps=20",
    "--eval_every=10",
    "--batch_size=32",
    "--hidden_layers=2",
    "--hidden_units=16",
    "--sg_hidden_layers=1",
    "--sg_hidden_units=16",
    "--num_seeds=2",
    "--sweep=learning_rate=1e-3,3e-3",
    "--loop_steps=5",
    "--loop_repeats=1",
]
# vmap batches the matrix products differently from a run alone, so results agree to float
# reassociation, not bit for bit: a tight relative tolerance.
RTOL = 1e-4
ATOL = 1e-6


def _parse(argv: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["benchmark", *argv])
    return fv


def _tiny_benchmark(output_dir: Path) -> dict[str, Any]:
    """The tiny benchmark, written to ``output_dir``: its files' paths and, per program, what the
    tests read (config, runs' seeds and learning rates, vmapped and separate histories) as JSON."""
    result, files, _ = run(_parse([*TINY_FLAGS, f"--output_dir={output_dir}"]), log=lambda _: None)
    assert files is not None and result.status == "completed", result.message
    return {
        "files": {name: path and str(path) for name, path in dataclasses.asdict(files).items()},
        "programs": [
            {
                "config": dataclasses.asdict(program.spec.config),
                "seeds": program.spec.run_seeds().tolist(),
                "learning_rates": program.spec.run_learning_rates().tolist(),
                "history": {k: v.tolist() for k, v in program.history._asdict().items()},
                "separate": program.separate
                and {k: v.tolist() for k, v in program.separate.history._asdict().items()},
            }
            for program in result.programs
        ],
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], BenchmarkFiles]:
    """The tiny benchmark's programs (histories as numpy arrays) and files, computed once per
    session; the files lie in the session's folder, which every xdist worker reads."""
    folder = session_folder(tmp_path_factory)

    def compute() -> dict[str, Any]:
        return _tiny_benchmark(Path(tempfile.mkdtemp(prefix="tiny_benchmark", dir=folder)))

    record = computed_once(tmp_path_factory, "tiny_benchmark", compute)
    files = BenchmarkFiles(**{name: path and Path(path) for name, path in record["files"].items()})
    programs = record["programs"]
    for program in programs:
        for key in ("history", "separate"):
            if program[key] is not None:
                program[key] = {k: np.asarray(v) for k, v in program[key].items()}
    return programs, files


# ---------------------------------------------------------------------------------- files


def _main_table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("| run |")]
    start = text.splitlines().index(lines[0])
    table = []
    for line in text.splitlines()[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table[0], table[2:]


TABLE_HEADERS = tuple(name for name, _ in table_columns((0.9, 0.99)))


def test_tiny_benchmark_writes_every_file_and_column(tiny):
    programs, files = tiny
    assert files.grid is None  # no model or depth sweep
    for path in files.paths():
        assert Path(path).stat().st_size > 0, path

    text = files.table.read_text()
    headers, rows = _main_table(text)
    assert tuple(headers) == TABLE_HEADERS
    assert len(rows) == 2 * 2  # modes x learning rates
    for row in rows:
        assert len(row) == len(headers)
        assert all(cell for cell in row)
    assert any(row[0].startswith("sg (DNI 1x16) learning_rate=0.003") for row in rows)
    assert "±" in rows[0][1]  # mean ± std over 2 seeds
    bp_row = next(row for row in rows if row[0].startswith("bp"))
    assert bp_row[TABLE_HEADERS.index("time / bp")] == "1.00"
    for name in ("to 0.9 x bp acc", "to 0.99 x bp acc"):  # '0.12 s, 10 steps' or 'not reached'
        assert all(
            " s, " in row[TABLE_HEADERS.index(name)]
            or "not reached" in row[TABLE_HEADERS.index(name)]
            for row in rows
        )
    for section in ("lax.scan loop vs.", "Arithmetic rate", "Runs vmapped", "## Summary"):
        assert section in text
    summary = text.split("## Summary")[1]
    assert "FLOP ratio" in summary and "paper" in summary
    assert "Time to 0.99 x bp's final test accuracy" in summary and "3x faster" in summary

    record = json.loads(files.json.read_text())
    assert record["table_columns"] == list(TABLE_HEADERS)
    assert len(record["rows"]) == 4
    assert record["settings"]["num_seeds"] == 2
    assert record["settings"]["base_config"]["hidden_units"] == 16
    assert {"platform", "device_kind", "matmul_gflops"} <= set(record["device"])
    assert "jax" in record["versions"]
    for row in record["rows"]:
        assert row["gflop_per_step"] > 0 and row["ms_per_step"] > 0
        assert len(row["test_accuracy_per_seed"]) == 2
    assert record["settings"]["tta_fractions"] == [0.9, 0.99]
    for row in record["rows"]:
        bp = next(r for r in record["rows"] if r["mode"] == "bp" and r["sweep"] == row["sweep"])
        for reached, fraction in zip(row["time_to_accuracy"], (0.9, 0.99), strict=True):
            assert reached["fraction"] == fraction
            assert reached["threshold"] == pytest.approx(fraction * bp["test_accuracy_mean"])
            assert len(reached["steps"]) == len(reached["seconds"]) == 2  # per seed
            for steps, seconds in zip(reached["steps"], reached["seconds"], strict=True):
                assert (steps is None) == (seconds is None)
                if steps is not None:  # the program's time pro-rated to that evaluation's step
                    assert steps in (10, 20)
                    assert seconds == pytest.approx(row["train_time_s"] * steps / 20)
    sg = next(r for r in record["rows"] if r["mode"] == "sg")
    assert sg["flop_ratio_bp"] > 1  # the modules add arithmetic
    assert len(record["loop_comparison"]) == 2
    assert len(programs) == 2  # learning rates share one program per mode


def test_time_to_accuracy_is_the_first_evaluation_at_or_above_the_threshold():
    steps = np.array([[100, 200, 300, 400]] * 3)
    accuracy = [[0.5, 0.8, 0.92, 0.95], [0.91, 0.93, 0.94, 0.96], [0.5, 0.6, 0.7, 0.8]]
    reached = [Reached.of(f, t, steps, steps / 100, accuracy) for f, t in ((0.9, 0.9), (1, 0.93))]
    assert reached[0].steps == (300, 100, None) and reached[0].seconds == (3.0, 1.0, None)
    assert reached[1].steps == (400, 200, None)  # equal to the threshold counts
    assert reached[0].cell() == "3.00 s, 300 steps (reached by 2/3 seeds)"  # never counts as never
    assert reached[1].to_dict()["median_seconds"] == 4.0
    assert reached[1].to_dict()["threshold"] == 0.93
    two = Reached.of(0.9, 0.9, steps[:2], steps[:2], [accuracy[0], accuracy[2]])
    assert two.cell() == "not reached (reached by 1/2 seeds)"
    assert two.to_dict()["median_steps"] is None
    assert Reached.of(0.99, 0.99, steps, steps, accuracy).cell() == "not reached"


@pytest.mark.parametrize("value", ["0", "1.5", "0.9,x", ""])
def test_bad_tta_fractions_are_a_config_error(value):
    with pytest.raises(ConfigError, match="--tta_fractions=.* in \\(0, 1\\]"):
        settings_from_flags(_parse([f"--tta_fractions={value}"]))


@pytest.mark.parametrize("name", ["curves", "sg_loss", "time_per_step", "accuracy_time"])
def test_plots_are_real_images_with_drawn_content(tiny, name):
    _, files = tiny
    image = matplotlib.image.imread(getattr(files, name))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    pixels = image[..., :3].reshape(-1, 3)
    assert pixels.std() > 0.05
    colours = np.unique(np.round(pixels * 255).astype(np.uint8), axis=0)
    assert len(colours) > 20


# ---------------------------------------------------------------------------------- equality


def test_vmapped_runs_equal_separate_runs_and_seeds_differ(tiny):
    programs, _ = tiny
    for program in programs:
        assert program["separate"] is not None
        assert program["separate"].keys() == program["history"].keys()
        for name, vmapped in program["history"].items():
            np.testing.assert_allclose(vmapped, program["separate"][name], rtol=RTOL, atol=ATOL)
        # runs 0 and 1: same learning rate, seeds 0 and 1; runs 0 and 2: other learning rate
        losses = program["history"]["test_loss"]
        assert np.max(np.abs(losses[0] - losses[1])) > 1e-3
        assert np.max(np.abs(losses[0] - losses[2])) > 1e-3


SHARDED = """
import dataclasses, json, sys
import jax, numpy as np
from sgjax.bench.programs import run_mesh, train_runs
from sgjax.training.config import TrainConfig
from sgjax.data import load_dataset, to_device

config = TrainConfig(**json.loads(sys.argv[1]))
seeds, lrs = np.asarray(json.loads(sys.argv[2])), np.asarray(json.loads(sys.argv[3]))
assert jax.device_count() == 2, jax.devices()
data = to_device(load_dataset(config.dataset, config.data_dir))
execution = train_runs(config, seeds, lrs, data, run_mesh())
np.savez(sys.argv[4], num_devices=execution.num_devices, **execution.history._asdict())
"""


def test_sharded_run_axis_over_two_devices_equals_unsharded(tiny, tmp_path):
    programs, _ = tiny
    program = programs[0]  # bp
    runs = slice(0, 3)  # 3 runs over 2 devices: also exercises the padding
    seeds, lrs = program["seeds"][runs], program["learning_rates"][runs]
    out = tmp_path / "sharded.npz"
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    env["JAX_PLATFORMS"] = "cpu"
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            SHARDED,
            json.dumps(program["config"]),
            json.dumps(seeds),
            json.dumps(lrs),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    sharded = np.load(out)
    assert int(sharded["num_devices"]) == 2
    for name, unsharded in program["history"].items():
        np.testing.assert_allclose(sharded[name], unsharded[runs], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------- presets


def test_paper_500k_preset_is_the_papers_settings():
    settings = settings_from_flags(_parse(["--preset=paper_500k"]))
    base = settings.base
    assert (base.num_steps, base.batch_size, base.learning_rate) == (500_000, 256, 3e-5)
    assert base.resolved_lr_boundaries == (300_000, 400_000)
    assert (base.hidden_layers, base.hidden_units) == (3, 256)
    assert settings.modes == ("bp", "sg", "cdni")
    modules = {
        p.config.mode: (p.config.resolved_sg_hidden_layers, p.config.sg_hidden_units)
        for p in settings.programs()
    }
    assert modules["sg"] == (2, 1024)
    assert modules["cdni"][0] == 0  # linear


def test_paper_100k_preset_keeps_the_schedule_shape():
    base = settings_from_flags(_parse(["--preset=paper_100k"])).base
    assert (base.num_steps, base.batch_size, base.learning_rate) == (100_000, 256, 3e-5)
    assert base.resolved_lr_boundaries == (60_000, 80_000)


def test_explicit_flags_override_the_preset():
    argv = ["--preset=paper_500k", "--batch_size=128", "--num_steps=50000", "--sg_hidden_units=256"]
    settings = settings_from_flags(_parse([*argv, "--modes=bp,sg", "--num_seeds=3"]))
    base = settings.base
    assert (base.batch_size, base.num_steps, base.sg_hidden_units) == (128, 50_000, 256)
    assert base.learning_rate == 3e-5  # from the preset
    assert base.resolved_lr_boundaries == (30_000, 40_000)
    assert settings.modes == ("bp", "sg") and settings.seeds == (0, 1, 2)


def test_quick_preset_is_small():
    settings = settings_from_flags(_parse(["--preset=quick"]))
    assert settings.base.num_steps <= 1000 and settings.num_seeds >= 2
    assert all(p.config.resolved_sg_hidden_layers <= 1 for p in settings.programs())


# ---------------------------------------------------------------------------------- sweeps


def test_traced_sweep_shares_a_program_and_static_sweep_does_not():
    fv = _parse(["--sweep=learning_rate=1e-4,3e-4", "--sweep=sg_hidden_units=64,128"])
    programs = settings_from_flags(fv).programs()
    # bp ignores the module width: 1 program; sg and cdni: one per width; rates vmapped inside
    assert [(p.config.mode, dict(p.static)) for p in programs] == [
        ("bp", {}),
        ("sg", {"sg_hidden_units": 64}),
        ("sg", {"sg_hidden_units": 128}),
        ("cdni", {"sg_hidden_units": 64}),
        ("cdni", {"sg_hidden_units": 128}),
    ]
    assert all(p.learning_rates == (1e-4, 3e-4) and p.num_runs == 2 for p in programs)


def test_stale_decay_sweep_runs_the_stale_modes_per_decay_and_names_the_best():
    decays = "--sweep=stale_decay=0.9,0.9999"
    fv = _parse(["--modes=bp,zero_grad,stale_grad,stale_grad_example", decays])
    programs = settings_from_flags(fv).programs()
    # Only the stale modes read the decay: the others run once.
    assert [(p.config.mode, dict(p.static)) for p in programs] == [
        ("bp", {}),
        ("zero_grad", {}),
        *[
            (m, {"stale_decay": d})
            for m in ("stale_grad", "stale_grad_example")
            for d in (0.9, 0.9999)
        ],
    ]
    assert [p.config.stale_decay for p in programs[2:4]] == [0.9, 0.9999]
    with pytest.raises(ConfigError, match="must be in"):
        settings_from_flags(_parse(["--modes=stale_grad", "--sweep=stale_decay=0.9,1"]))
    # The summary names each swept mode's best run (by mean test accuracy over seeds).
    history = collections.namedtuple("History", "test_accuracy")
    rows = [
        Row(f"stale {p.config.stale_decay}", p.config, p.static,
            SimpleNamespace(history=history(np.array(accuracy))), slice(None), None, None)
        for p, accuracy in zip(programs[2:4], ([[0.5], [0.7]], [[0.4], [0.9]]), strict=True)
    ]  # fmt: skip
    best = [line for line in summary_lines(None, rows) if line.startswith("- Best")]
    assert best == ["- Best of the 2 stale_grad runs: stale 0.9999 (0.6500 ± 0.2500)."], best


@pytest.mark.parametrize(
    "spec",
    [
        "learning_rate",
        "=1e-4",
        "learning_rate=",
        "learning_rate=1e-4,,3e-4",
        "learning_rate=fast",
        "hidden_units=1.5",
        "nonsense=1,2",
        "mode=bp,sg",
        "learning_rate=1e-4,1e-4",
    ],
)
def test_malformed_sweep_is_a_config_error(spec):
    with pytest.raises(ConfigError):
        parse_sweep(spec)


def test_malformed_sweep_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "benchmark.py"),
            "--sweep=learning_rate",
            f"--output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --sweep=learning_rate")
    assert not list(tmp_path.iterdir())  # nothing ran


def test_seeds_up_to_the_largest_uint32_train_in_a_program():
    """Seeds in [2**31, 2**32) are valid and used to overflow the benchmark's int32 seeds."""
    top = 2**32 - 1
    base = TrainConfig(
        mode="bp",
        seed=top - 1,
        num_steps=4,
        eval_every=2,
        batch_size=16,
        hidden_layers=1,
        hidden_units=8,
    )
    settings = BenchmarkSettings(base=base, modes=("bp",), num_seeds=2).validate()
    (spec,) = settings.programs()
    assert spec.run_seeds().tolist() == [top - 1, top]
    # (A step FLOP count given: its program, which this test does not read, is not compiled.)
    data = to_device(load_dataset("mnist", None))
    result = run_program(spec, data, separate=True, step_flops=float("nan"))
    assert result.separate is not None
    chex.assert_trees_all_close(result.history, result.separate.history, rtol=RTOL, atol=ATOL)
    assert np.max(np.abs(result.history.test_loss[0] - result.history.test_loss[1])) > 1e-4
    # The vmapped program's uint32 seed gives the same run as the single-run config's seed.
    for seed in (top - 1, top):
        alone = init_train_state(dataclasses.replace(base, seed=seed))
        traced = jax.jit(init_train_state, static_argnums=0)(base, np.uint32(seed))
        chex.assert_trees_all_equal(alone, traced)


def test_seed_range_and_number_of_seeds_are_bounded():
    base = TrainConfig(seed=2**32 - 1)
    with pytest.raises(ConfigError, match="reaches seed 4294967296"):
        BenchmarkSettings(base=base, num_seeds=2).validate()
    with pytest.raises(ConfigError, match="--num_seeds=1025 must be between 1 and 1024"):
        BenchmarkSettings(base=TrainConfig(), num_seeds=1025).validate()


def test_plain_and_unlocked_cdni_are_separate_columns():
    """--modes=cdni,cdni_unlock: two programs, the second with synthetic inputs, each row and
    program named by its method (the complete unlock's comparison in one benchmark)."""
    from sgjax.bench.report import mode_label
    from sgjax.bench.sweep import benchmark_mode

    base = TrainConfig(num_steps=10, eval_every=10, sg_hidden_layers=0)
    settings = BenchmarkSettings(base=base, modes=("cdni", "cdni_unlock")).validate()
    plain, unlocked = (p.config for p in settings.programs())
    assert (plain.mode, plain.synthetic_inputs) == ("cdni", False)
    assert (unlocked.mode, unlocked.synthetic_inputs) == ("cdni", True)
    assert [benchmark_mode(c) for c in (plain, unlocked)] == ["cdni", "cdni_unlock"]
    assert mode_label(unlocked).startswith("cdni_unlock (cDNI + synthetic inputs")
    with pytest.raises(ConfigError, match="unknown mode 'bp_unlock'.*cdni_unlock"):
        BenchmarkSettings(base=base, modes=("bp_unlock",)).validate()
    # --synthetic_inputs would make cdni the same program as cdni_unlock: one line instead.
    with pytest.raises(ConfigError, match="the same program twice") as error:
        settings_from_flags(_parse(["--modes=bp,cdni,cdni_unlock", "--synthetic_inputs"]))
    assert "\n" not in str(error.value)
