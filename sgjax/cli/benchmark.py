"""The benchmark's command line (``experiments/benchmark.py``): flags, presets, run, files."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import jax
from absl import flags

from sgjax.bench import parallel, sweep
from sgjax.bench.grid import grid_applies, grid_markdown, grid_notes, grid_of
from sgjax.bench.names import write_report
from sgjax.bench.plots import plot_accuracy_time, plot_curves, plot_sg_loss, plot_time_per_step
from sgjax.bench.presets import PRESETS, SWEEP_PRESET, apply_preset, preset_overrides
from sgjax.bench.programs import BenchmarkResult, BenchmarkSettings, run_benchmark
from sgjax.bench.report import build_json, build_rows, table_markdown
from sgjax.bench.rnn_table import RNN_PRESETS, run_rnn_table
from sgjax.bench.store import OUTPUT_FILES, ProgramStore, divergence
from sgjax.bench.update_prob import SWEEP_FILES, run_sweep, write_sweep
from sgjax.cli.distributed import define_distributed_flags, initialize_from_flags
from sgjax.cli.errors import fail, parse_int_list
from sgjax.cli.flags import (
    config_from_flags,
    define_cnn_flags,
    define_decoupling_flags,
    define_train_flags,
)
from sgjax.cli.run import StopRequest, agreed, check_fits, claim_output_dir, report_status
from sgjax.data.device import to_device
from sgjax.data.sources import DataError, Dataset, load_dataset
from sgjax.parallel.layers import validate_parallel
from sgjax.training.config import MODELS, MODES, PAPER_MODES, ConfigError, TrainConfig
from sgjax.training.records import OutputError

DEFAULT_OUTPUT_DIR = "runs/benchmark"
_PRESET_HELP = "; ".join(f"{n}: {p.description}" for n, p in {**PRESETS, **RNN_PRESETS}.items())
# fmt: off
_FLAGS = (  # (define, name, default, [enum values,] help): the benchmark's own flags
    (flags.DEFINE_enum, "preset", None, [*PRESETS, *RNN_PRESETS],
     f"Named settings; explicit flags override them. {_PRESET_HELP}"),
    (flags.DEFINE_list, "modes", list(PAPER_MODES),
     f"Modes to compare ({', '.join(MODES)}; sg_unlock and cdni_unlock are sg and cdni with "
     "--synthetic_inputs, so plain and unlocked runs show side by side)."),
    (flags.DEFINE_integer, "num_seeds", 1,
     "Seeds (--seed, --seed+1, ...) trained in one vmapped program."),
    (flags.DEFINE_multi_string, "sweep", [],
     "name=v1,v2: run every value (repeat the flag for more names; every combination runs). "
     f"Vmapped in one program: {', '.join(sweep.TRACED_FIELDS)}; one program per value: "
     f"{', '.join(sweep.STATIC_FIELDS)}."),
    (flags.DEFINE_enum, "model", TrainConfig().model, list(MODELS),
     "mlp: the fully connected network (FCN); cnn: the paper's convolutional network "
     "(--hidden_layers conv stages, --filters, --kernel_size, convolutional synthesizers)."),
    (flags.DEFINE_string, "output_dir", DEFAULT_OUTPUT_DIR,
     "Where table.md, benchmark.json and plots go."),
    (flags.DEFINE_integer, "loop_steps", 200,
     "Steps per timing of the lax.scan loop vs. the jitted step from a Python loop (0: skip)."),
    (flags.DEFINE_integer, "loop_repeats", 3, "Timed repeats (median)."),
    (flags.DEFINE_list, "tta_fractions", ["0.9", "0.99"],
     "Time to accuracy: seconds and steps of each mode to these fractions of bp's final test "
     "accuracy (table columns 'to f x bp acc', benchmark.json rows' time_to_accuracy)."),
    (flags.DEFINE_boolean, "compare_separate", True,
     "With several runs per program, also run each alone (time ratio and equality check)."),
    (flags.DEFINE_enum, "parallel", "none", ["none", "layers"],
     "layers: instead of the vmapped programs, compare bp (single device, model-parallel, "
     "GPipe) with the first synthetic-gradient mode of --modes (single device, layer-parallel "
     "pipeline) on --parallel_devices devices."),
    (flags.DEFINE_list, "parallel_devices", ["1", "2", "4"],
     "Device counts for --parallel=layers."),
    (flags.DEFINE_integer, "microbatches", 4, "GPipe microbatches for --parallel=layers."),
    (flags.DEFINE_boolean, "resume", False,
     "Continue a stopped benchmark in --output_dir: finished programs are not run again."),
    (flags.DEFINE_boolean, "overwrite", False, "Replace an earlier benchmark in --output_dir."),
    (flags.DEFINE_boolean, "distributed", False,
     "Join a multi-process run with jax.distributed first (runs shard over every process's "
     "devices; process 0 writes); see --coordinator_address."),
)
# fmt: on


def define_flags(fv: flags.FlagValues) -> None:
    """The training flags of mnist_mlp.py (``--modes`` for ``--mode``) plus the benchmark's."""
    for define, name, default, *rest in _FLAGS:
        define(name, default, *rest, flag_values=fv)
    define_decoupling_flags(fv)
    define_train_flags(fv)
    define_cnn_flags(fv)
    define_distributed_flags(fv, with_switch=False)


def settings_from_flags(fv: flags.FlagValues) -> BenchmarkSettings:
    """``--preset`` under the explicit flags, then settings validated (ConfigError)."""
    if fv.preset:
        apply_preset(fv, fv.preset)
    base = config_from_flags(
        fv, mode=MODES[0], model=fv.model, output_dir=fv.output_dir, synthetic_inputs=False
    )
    overrides = preset_overrides(fv, fv.preset) if fv.preset else ()
    if fv.synthetic_inputs:  # the complete unlock applies to the DNI modes only
        twice = [m for m in ("sg", "cdni") if m in fv.modes and f"{m}_unlock" in fv.modes]
        if twice:
            raise ConfigError(
                f"--synthetic_inputs turns --modes={twice[0]} into {twice[0]}_unlock, which "
                "--modes also lists (the same program twice); drop --synthetic_inputs to "
                "compare the plain and unlocked runs"
            )
        unlock = (("synthetic_inputs", True),)
        overrides += tuple(sweep.Override((("mode", m),), unlock) for m in ("sg", "cdni"))
    return BenchmarkSettings(
        base=base, modes=tuple(fv.modes), num_seeds=fv.num_seeds,
        sweeps=sweep.parse_sweeps(fv.sweep), loop_steps=fv.loop_steps,
        loop_repeats=fv.loop_repeats, compare_separate=fv.compare_separate, preset=fv.preset,
        overrides=overrides, tta_fractions=tta_fractions(fv),
    ).validate()  # fmt: skip


def tta_fractions(fv: flags.FlagValues) -> tuple[float, ...]:
    try:
        fractions = tuple(map(float, fv.tta_fractions))
    except ValueError:
        fractions = ()
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ConfigError(
            f"--tta_fractions={','.join(fv.tta_fractions)} must list fractions of bp's final "
            "test accuracy in (0, 1], e.g. 0.9,0.99"
        )
    return fractions


def load_datasets(settings: BenchmarkSettings) -> dict[str, Dataset]:
    datasets: dict[str, Dataset] = {}
    for spec in settings.programs():
        config = spec.config
        if config.dataset not in datasets:
            datasets[config.dataset] = load_dataset(config.dataset, config.data_dir)
        check_fits(config, datasets[config.dataset])
    return datasets


@dataclasses.dataclass(frozen=True)
class BenchmarkFiles:
    table: Path
    json: Path
    curves: Path | None = None
    sg_loss: Path | None = None
    time_per_step: Path | None = None
    grid: Path | None = None
    accuracy_time: Path | None = None

    def paths(self) -> list[Path]:
        return [p for p in dataclasses.astuple(self) if p is not None]


def write_outputs(result: BenchmarkResult, folder: Path) -> BenchmarkFiles:
    """table.md, benchmark.json, the plots, and grid.md for a grid of models and depths."""
    rows = build_rows(result)
    record = build_json(result, rows)
    grid_path = None
    if grid_applies(result.settings.sweeps):
        grid = grid_of(result, rows)
        grid_path = folder / "grid.md"
        grid_path.write_text(grid_markdown(grid, grid_notes(result)))
        record["grid"] = grid.to_dict()
    table, json_path = folder / "table.md", folder / "benchmark.json"
    write_report(table, table_markdown(result, rows), json_path, record)
    return BenchmarkFiles(
        table=table,
        json=json_path,
        curves=plot_curves(rows, folder / "curves.png"),
        sg_loss=plot_sg_loss(rows, folder / "sg_loss.png"),
        time_per_step=plot_time_per_step(
            rows, result.loops, result.matmul_gflops, folder / "time_per_step.png"
        ),
        grid=grid_path,
        accuracy_time=plot_accuracy_time(rows, folder / "accuracy_time.png"),
    )


def run(
    fv: flags.FlagValues, log: Callable[[str], None] = print
) -> tuple[BenchmarkResult | parallel.ParallelBenchmark, BenchmarkFiles | None, int | None]:
    """Flags -> settings -> data -> programs -> files; bad input exits 2 before training."""
    try:
        initialize_from_flags(fv)
        # The layer-parallel flags must make sense even when --parallel=layers is not given.
        if fv.microbatches < 1:
            raise ConfigError(f"--microbatches={fv.microbatches} must be a positive integer")
        counts = parse_int_list("parallel_devices", fv.parallel_devices) or ()
        if not counts or any(n < 1 for n in counts):
            raise ConfigError("--parallel_devices must list positive device counts, e.g. 1,2,4")
    except ConfigError as error:
        fail(str(error))
    if fv.parallel == "layers":
        if jax.process_count() > 1:
            fail(
                "--parallel=layers in the benchmark runs in one process; for layers across "
                "processes run experiments/mnist_mlp.py --parallel=layers --engine=spmd "
                "--distributed"
            )
        return run_layer_parallel(fv, log)
    writer = jax.process_index() == 0  # only process 0 writes (--distributed)
    try:
        if fv.resume and fv.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
        settings = settings_from_flags(fv)
        datasets = load_datasets(settings)
        folder = Path(fv.output_dir)
        if writer:
            claim_output_dir(folder, fv.resume, fv.overwrite, OUTPUT_FILES)
        store = ProgramStore(folder)
        reads = fv.resume and (store.folder / "settings.json").exists()
        done = store.start(settings, fv.resume) if writer or reads else {}
    except (ConfigError, DataError, OutputError) as error:
        fail(str(error))
    for dataset in datasets.values():
        log(f"data: {dataset.reason}")
    if settings.preset:
        log(f"preset {settings.preset}: {PRESETS[settings.preset].description}")
    with StopRequest() as stop:
        result = run_benchmark(
            settings, datasets, log=log, done=done,
            on_program=store.save if writer else lambda index, program: None,
            stop_requested=agreed(stop), divergence=divergence,
        )  # fmt: skip
    files = write_outputs(result, folder) if writer else None
    return result, files, stop.signal


def parallel_settings_from_flags(fv: flags.FlagValues) -> parallel.ParallelBenchmarkSettings:
    if fv.preset:
        apply_preset(fv, fv.preset)
    if fv.resume or fv.sweep or fv.num_seeds != 1:
        raise ConfigError(
            "--parallel=layers runs one seed without sweeps or --resume; drop --resume, --sweep "
            "and --num_seeds"
        )
    decoupled = [m for m in fv.modes if m != "bp"]
    if not decoupled or decoupled[0] not in sweep.BENCHMARK_MODES:
        raise ConfigError(
            "--parallel=layers needs a decoupled mode (sg, cdni, sg_unlock, cdni_unlock, dgl or "
            "zero_grad) in --modes (compared with bp)"
        )
    fields = {"synthetic_inputs": False, **sweep.mode_fields(decoupled[0])}
    if fv.synthetic_inputs and fields["mode"] in ("sg", "cdni"):
        fields["synthetic_inputs"] = True
    base = dict(output_dir=fv.output_dir, model=fv.model)
    settings = parallel.ParallelBenchmarkSettings(
        sg=config_from_flags(fv, **fields, **base).validate(),
        bp=config_from_flags(fv, mode="bp", synthetic_inputs=False, **base).validate(),
        device_counts=parse_int_list("parallel_devices", fv.parallel_devices) or (1,),
        microbatches=fv.microbatches, tta_fractions=tta_fractions(fv),
    )  # fmt: skip
    validate_parallel(settings.bp, "bp_gpipe", settings.microbatches)
    return settings


def run_layer_parallel(
    fv: flags.FlagValues, log: Callable[[str], None]
) -> tuple[parallel.ParallelBenchmark, BenchmarkFiles | None, int | None]:
    """--parallel=layers: run the comparison, write table.md and benchmark.json."""
    try:
        settings = parallel_settings_from_flags(fv)
        dataset = load_dataset(settings.bp.dataset, settings.bp.data_dir)
        check_fits(settings.sg, dataset)
        folder = claim_output_dir(Path(fv.output_dir), False, fv.overwrite, OUTPUT_FILES)
    except (ConfigError, DataError, OutputError) as error:
        fail(str(error))
    log(f"data: {dataset.reason}")
    with StopRequest() as stop:
        result = parallel.run_parallel_benchmark(settings, dataset, log=log, stop_requested=stop)
    lines = [f"# Layer-parallel training: backprop vs. {sweep.benchmark_mode(settings.sg)}", ""]
    if result.status != "completed":
        lines += [f"Status: {result.status} ({result.message})", ""]
    table = parallel.table_lines(result.rows, settings.tta_fractions)
    paths = write_report(
        folder / "table.md",
        "\n".join([*lines, *table, "", *parallel.notes(settings)]) + "\n",
        folder / "benchmark.json",
        {
            "status": result.status,
            "message": result.message,
            "parallel": True,
            "settings": {"sg": settings.sg.to_dict(), "bp": settings.bp.to_dict()}
            | {k: getattr(settings, k) for k in ("device_counts", "microbatches", "tta_fractions")},
            "dataset": dataset.describe(),
            "rows": [row.to_dict() for row in result.rows],
        },
    )
    return result, BenchmarkFiles(*paths), stop.signal


RNN_TABLE_FLAGS = ("preset", "output_dir", "seed", "num_seeds", "num_steps", "overwrite")
"""The flags a recurrent preset (paper_rnn, paper_rnn_quick) takes; the rest are refused."""
RNN_TABLE_FILES = ("table.md", "results.json")


def run_recurrent_preset(fv: flags.FlagValues) -> int:
    probe = flags.FlagValues()
    define_flags(probe)
    given = sorted(f"--{n}" for n in probe if fv[n].present and n not in RNN_TABLE_FLAGS)
    try:
        if given:
            raise ConfigError(
                f"{', '.join(given)} {'do' if len(given) > 1 else 'does'} not apply to "
                f"--preset={fv.preset} (a recurrent table); it takes "
                + ", ".join("--" + n for n in RNN_TABLE_FLAGS[1:])
            )
        for name in ("num_seeds", "num_steps"):
            if fv[name].present and fv[name].value <= 0:
                raise ConfigError(f"--{name}={fv[name].value} must be a positive integer")
        folder = claim_output_dir(Path(fv.output_dir), False, fv.overwrite, RNN_TABLE_FILES)
    except (ConfigError, OutputError) as error:
        fail(str(error))
    _log(f"preset {fv.preset}: {RNN_PRESETS[fv.preset].description}")
    start = time.perf_counter()
    given = {n: fv[n].value if fv[n].present else None for n in ("num_seeds", "num_steps")}
    with StopRequest() as stop:
        status, message = run_rnn_table(fv.preset, folder, seed=fv.seed, log=_log, **given)
    _show([folder / name for name in RNN_TABLE_FILES], start)
    return report_status(status, message, folder, stop.signal, resumable=False)


def run_update_prob_preset(fv: flags.FlagValues) -> int:
    try:
        settings = settings_from_flags(fv)
        for mode in settings.modes:
            if mode not in PAPER_MODES:
                raise ConfigError(
                    f"--preset={SWEEP_PRESET} sweeps bp, sg and cdni; drop {mode} from --modes"
                )
        if fv.update_prob != 1.0 or settings.sweeps:
            raise ConfigError(f"--preset={SWEEP_PRESET} draws p itself; drop --update_prob/--sweep")
        datasets = load_datasets(settings)
        folder = claim_output_dir(Path(fv.output_dir), False, fv.overwrite, SWEEP_FILES)
    except (ConfigError, DataError, OutputError) as error:
        fail(str(error))
    _log(f"preset {SWEEP_PRESET}: {PRESETS[SWEEP_PRESET].description}")
    start = time.perf_counter()
    base = settings.base
    results = run_sweep(
        base, settings.modes, settings.num_seeds, to_device(datasets[base.dataset]), _log
    )
    _show(write_sweep(results, base, folder), start)
    return 0


_log = functools.partial(print, flush=True)


def _show(paths: list[Path], start: float) -> None:
    if paths:
        _log(paths[0].read_text())
        _log(f"wrote {', '.join(str(p) for p in paths)}")
    _log(f"benchmark took {time.perf_counter() - start:.0f} s")


def main(fv: flags.FlagValues) -> int:
    if fv.preset in RNN_PRESETS:
        return run_recurrent_preset(fv)
    if fv.preset == SWEEP_PRESET:
        return run_update_prob_preset(fv)
    start = time.perf_counter()
    result, files, signum = run(fv, log=_log)
    _show(files.paths() if files is not None else [], start)
    resumable = fv.parallel != "layers"
    return report_status(result.status, result.message, Path(fv.output_dir), signum, resumable)
