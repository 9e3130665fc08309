"""The feed-forward grid: the table builder on synthetic numbers, the grid presets' settings, and
one toy grid (FCN and CNN, depth 3, bp and cDNI, 2 seeds, 4 steps) through the command.

The toy grid leaves DNI out to stay under a minute on 2 shared cores (each program compiles its
run and two FLOP-counting programs); the builder's tests fill every DNI cell."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from absl import flags

from sgjax.bench.grid import PAPER_GRID, GridEntry, build_grid, grid_applies, grid_markdown
from sgjax.bench.report import mode_label
from sgjax.bench.sweep import parse_sweeps
from sgjax.cli.benchmark import define_flags, run, settings_from_flags
from sgjax.training.architecture import config_facts, merge_depths
from sgjax.training.config import ConfigError, TrainConfig

TOY_FLAGS = [
    "--preset=paper_grid_quick",
    "--modes=bp,cdni",
    "--sweep=model=mlp,cnn",
    "--sweep=hidden_layers=2",
    "--num_steps=4",
    "--eval_every=4",
    "--batch_size=8",
    "--hidden_units=8",
    "--sg_hidden_units=8",
    "--filters=2",
    "--kernel_size=3",
]


def _parse(argv: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["benchmark", *argv])
    return fv


def _entry(dataset: str, model: str, depth: int, mode: str, errors: list[float]) -> GridEntry:
    config = TrainConfig(
        mode=mode, model=model, dataset=dataset, hidden_layers=depth - 1, num_steps=1000
    )
    return GridEntry(config, np.asarray(errors))


# ---------------------------------------------------------------------------------- the builder


def test_grid_builder_on_synthetic_numbers():
    entries = [
        _entry(dataset, model, depth, mode, [float(depth), depth + 2.0])
        for dataset in ("mnist", "cifar10")
        for model in ("mlp", "cnn")
        for depth in (3, 4, 5, 6)
        for mode in ("bp", "sg", "cdni", "zero_grad")
        if mode != "zero_grad" or dataset == "mnist"  # each config is traced once: keep it cheap
    ]
    grid = build_grid(entries, {"mnist": "MNIST data", "cifar10": "CIFAR data"}, "a device")
    headers = grid.headers()
    assert headers[0] == "task" and headers[-3:] == ["steps", "data", "device"]
    assert headers[1:5] == [
        "3 layers backprop",
        "3 layers DNI",
        "3 layers cDNI",
        "3 layers zero gradient",  # the control: hidden layers frozen, the classifier trained
    ]
    assert len(headers) == 1 + 4 * 4 + 3
    body = {row[0]: dict(zip(headers, row, strict=True)) for row in grid.body()}
    assert list(body) == ["MNIST FCN", "MNIST CNN", "CIFAR-10 FCN", "CIFAR-10 CNN"]
    # mean and population std of (d, d + 2): d + 1 ± 1
    assert body["MNIST CNN"]["4 layers backprop"] == "5.00 ± 1.00"
    assert body["MNIST CNN"]["6 layers zero gradient"] == "7.00 ± 1.00"
    assert body["CIFAR-10 CNN"]["6 layers zero gradient"] == "-"
    # the paper's cells beside ours, exactly where its text quotes them
    assert body["MNIST FCN"]["3 layers cDNI"] == "4.00 ± 1.00 (paper 2.2)"
    assert body["MNIST FCN"]["6 layers cDNI"].endswith("(paper 1.6)")
    assert body["CIFAR-10 FCN"]["5 layers DNI"].endswith("(paper 47)")
    assert body["CIFAR-10 CNN"]["3 layers backprop"].endswith("(paper 17.9)")
    shown = sum("(paper" in cell for row in body.values() for cell in row.values())
    assert shown == len(PAPER_GRID)
    assert body["MNIST FCN"]["3 layers backprop"] == "4.00 ± 1.00"  # not quoted: ours alone
    assert body["CIFAR-10 FCN"]["data"] == "CIFAR data"
    assert body["MNIST CNN"]["device"] == "a device" and body["MNIST CNN"]["steps"] == "1,000"

    text = grid_markdown(grid)
    assert "| MNIST CNN | CNN 2/3/4/5x64 filters 5x5 (Conv-BN-ReLU-pool) + Dense 10 |" in text
    assert "| CIFAR-10 FCN | 2/3/4/5x256 (Dense-BN-ReLU) + Dense 10 |" in text
    assert "1,000 steps (paper 500,000)" in text
    assert "not run here" not in text  # every quoted task ran
    assert "Zero gradient: the control" in text
    record = grid.to_dict()
    assert record["headers"] == headers and len(record["rows"]) == 4
    cell = record["rows"][0]["cells"][0]
    assert cell["test_error_percent"]["mean"] == 4.0 and cell["test_error_percent"]["paper"] is None


def test_grid_builder_marks_missing_cells_and_single_seeds():
    entries = [
        _entry("mnist", "mlp", 3, "cdni", [3.5]),
        _entry("mnist", "mlp", 4, "bp", [2.0]),
    ]
    grid = build_grid(entries, {}, "cpu")
    assert grid.depths == (3, 4)
    (row,) = grid.body()
    cells = dict(zip(grid.headers(), row, strict=True))
    assert cells["3 layers cDNI"] == "3.50 (paper 2.2)"
    assert cells["4 layers cDNI"] == "- (paper 1.9)"
    assert cells["3 layers backprop"] == "-"
    text = grid_markdown(grid)
    assert "- CIFAR-10 FCN: 5 layers backprop 42, 5 layers DNI 47, 5 layers cDNI 44" in text
    assert "1 seed(s)" in text


def test_the_papers_settings_differ_in_nothing():
    config = TrainConfig(mode="sg", num_steps=500_000, hidden_layers=2)
    grid = build_grid([GridEntry(config, np.zeros(3))], {}, "gpu")
    assert grid.rows[0].differences_from_paper == "none"


@pytest.mark.parametrize(
    ("sweeps", "applies"),
    [
        ([], False),
        (["learning_rate=1e-3,3e-3"], False),
        (["hidden_layers=2,3"], True),
        (["model=mlp,cnn", "hidden_layers=2,3", "dataset=mnist,fashion_mnist"], True),
        (["model=mlp,cnn", "learning_rate=1e-3,3e-3"], False),
    ],
)
def test_grid_applies_to_model_and_depth_sweeps_only(sweeps, applies):
    assert grid_applies(parse_sweeps(sweeps)) is applies


# ---------------------------------------------------------------------------------- presets


def test_paper_grid_preset_is_the_papers_grid():
    settings = settings_from_flags(_parse(["--preset=paper_grid"]))
    programs = settings.programs()
    assert len(programs) == 2 * 4 * 4 and settings.num_seeds >= 3
    cells = {(p.config.model, p.config.hidden_layers + 1, p.config.mode) for p in programs}
    assert len(cells) == 32 and {d for _, d, _ in cells} == {3, 4, 5, 6}
    assert {m for _, _, m in cells} == {"bp", "sg", "cdni", "zero_grad"}  # with the control
    for p in programs:
        c = p.config
        assert (c.num_steps, c.batch_size, c.learning_rate) == (500_000, 256, 3e-5)
        assert c.resolved_lr_boundaries == (300_000, 400_000)
        assert c.resolved_filters == 64 and c.kernel_size == 5 and c.dataset == "mnist"
        assert c.pool_min_size == 0  # every stage pools, down to 1x1 at depth 6
        assert c.resolved_sg_hidden_layers == {"bp": 0, "sg": 2, "cdni": 0, "zero_grad": 0}[c.mode]
        if c.model == "mlp":
            assert (c.hidden_units, c.sg_hidden_units) == (256, 1024)


def test_paper_grid_on_cifar10_uses_its_widths():
    programs = settings_from_flags(_parse(["--preset=paper_grid", "--dataset=cifar10"])).programs()
    fcn = {p.config.mode: p.config for p in programs if p.config.model == "mlp"}
    assert fcn["bp"].hidden_units == 1000
    assert (fcn["sg"].resolved_sg_hidden_layers, fcn["sg"].sg_hidden_units) == (1, 4000)
    assert fcn["cdni"].resolved_sg_hidden_layers == 0
    cnn = [p.config for p in programs if p.config.model == "cnn"]
    assert {c.resolved_filters for c in cnn} == {128}
    assert {c.resolved_sg_hidden_layers for c in cnn if c.mode == "sg"} == {2}


def test_explicit_flags_win_over_the_grid_presets_per_task_values():
    argv = ["--preset=paper_grid", "--dataset=cifar10", "--hidden_units=512"]
    programs = settings_from_flags(_parse(argv)).programs()
    assert {p.config.hidden_units for p in programs} == {512}
    quick = settings_from_flags(_parse(["--preset=paper_grid_quick"])).programs()
    steps = {p.config.model: p.config.num_steps for p in quick}
    assert steps["cnn"] < steps["mlp"]  # the CNN's steps cost more
    cnn = {p.config.pool_min_size for p in quick if p.config.model == "cnn"}
    assert cnn == {7} and {p.config.mode for p in quick} == {"bp", "sg", "cdni", "zero_grad"}
    toy = settings_from_flags(_parse(["--preset=paper_grid_quick", "--num_steps=7"])).programs()
    assert {p.config.num_steps for p in toy} == {7}


def test_model_sweep_values_are_checked():
    with pytest.raises(ConfigError, match="not one of mlp,cnn"):
        parse_sweeps(["model=mlp,rnn"])


# ---------------------------------------------------------------------------------- the command


def test_toy_grid_writes_the_table_with_every_cell_filled(tmp_path):
    result, files, _ = run(_parse([*TOY_FLAGS, f"--output_dir={tmp_path}"]), log=lambda _: None)
    assert result.status == "completed" and len(result.programs) == 2 * 2
    text = files.grid.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert headers == ["task", "3 layers backprop", "3 layers cDNI", "steps", "data", "device"]
    rows = {
        cells[0]: dict(zip(headers, cells, strict=True))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:3])
    }
    assert list(rows) == ["MNIST FCN", "MNIST CNN"]
    for row in rows.values():
        for name in headers[1:3]:
            assert "±" in row[name], (name, row[name])  # 2 seeds: mean ± std
        assert row["steps"] == "4" and row["data"].startswith("mnist, 5,000 train")
        assert row["device"].startswith("cpu")
    assert rows["MNIST FCN"]["3 layers cDNI"].endswith("(paper 2.2)")
    assert "(paper" not in rows["MNIST CNN"]["3 layers cDNI"]
    assert "2 filters (paper 64)" in text and "4 steps (paper 500,000)" in text
    assert "- CIFAR-10 CNN: 3 layers backprop 17.9" in text

    record = json.loads(files.json.read_text())
    assert record["grid"]["headers"] == headers
    assert [row["task"] for row in record["grid"]["rows"]] == ["MNIST FCN", "MNIST CNN"]
    table = files.table.read_text()
    assert "cdni (cDNI conv linear) model=cnn hidden_layers=2" in table
    network = table.split("- network:")[1].splitlines()[0]
    assert "(Dense-BN-ReLU)" in network and "CNN 2x2 filters 3x3 (Conv-BN-ReLU-pool)" in network
    assert "2x8 (Dense-BN-ReLU)" in network
    assert "per task: model=cnn: num_steps=" not in table  # --num_steps was given: no override


def test_cnn_rows_describe_conv_synthesizers():
    cnn = TrainConfig(mode="sg", model="cnn", filters=64)
    assert mode_label(cnn) == "sg (DNI conv 2x64)"
    assert mode_label(dataclasses.replace(cnn, mode="cdni")) == "cdni (cDNI conv linear)"
    assert mode_label(TrainConfig(mode="sg")) == "sg (DNI 2x1024)"
    assert config_facts(cnn).description.startswith("CNN 3x64 filters 5x5")
    two, three = (config_facts(TrainConfig(hidden_layers=n)).description for n in (2, 3))
    assert merge_depths([two, three, two]) == "2/3x256 (Dense-BN-ReLU) + Dense 10"
