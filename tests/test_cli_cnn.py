"""experiments/mnist_cnn.py on the real command line: a run on a generated CIFAR-10 archive writes
its files and says which network it trained; bad input is one line and exit 2; SIGINT then
--resume is bitwise the uninterrupted run.

The bad inputs run in one subprocess (this file as a script, each case parsed and run in
process as tests/flag_fuzz.py does), so the cases cost one interpreter start, not one each.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_cifar import batch_payloads, write_archive

from sgjax.data import cifar
from sgjax.training.checkpoint import Checkpointer
from sgjax.training.config import TrainConfig
from sgjax.training.loop import init_train_state

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "mnist_cnn.py"
ENV = os.environ | {"JAX_PLATFORMS": "cpu"}
# Two conv stages of 4 filters, sg with one hidden (BatchNorm) conv layer in each synthesizer:
# the generated archive has 100 train and 20 test images, so a step and an evaluation take ms.
RUN = dict(
    mode="sg",
    dataset="cifar10",
    hidden_layers=2,
    filters=4,
    kernel_size=3,
    sg_hidden_layers=1,
    batch_size=16,
    learning_rate=1e-3,
    num_steps=200,
    eval_every=20,
    chunk_steps=5,
)


def _args(output_dir: Path, data_dir: Path, **overrides) -> list[str]:
    values = RUN | {"data_dir": data_dir, "output_dir": output_dir} | overrides
    return [sys.executable, str(SCRIPT), *[f"--{k}={v}" for k, v in values.items()]]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar")
    write_archive(folder / cifar.ARCHIVE, batch_payloads())
    return folder


@pytest.fixture(scope="module")
def uninterrupted(cifar_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(
        _args(output_dir, cifar_dir), capture_output=True, text=True, timeout=300, env=ENV
    )
    assert done.returncode == 0, done.stderr
    return output_dir, done


def test_a_run_on_a_cifar_archive_writes_its_files(uninterrupted):
    output_dir, done = uninterrupted
    assert done.stderr.strip() == ""
    results = json.loads((output_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["steps_done"] == 200
    assert results["dataset"]["name"] == "cifar10" and results["dataset"]["source"] == "cifar"
    assert (results["dataset"]["train_size"], results["dataset"]["test_size"]) == (100, 20)
    # Honest about the network: a CNN of 2 conv stages on 32x32x3, conv synthesizers.
    assert results["network"].startswith("CNN 2x4 filters 3x3 (Conv-BN-ReLU-pool) + Dense 10")
    assert results["network"].endswith("32x32x3 -> 8x8x4 -> 10")
    assert results["synthesizers"] == "conv 1x4"
    config = results["config"]
    assert (config["model"], config["filters"], config["kernel_size"]) == ("cnn", 4, 3)
    assert "hidden_units" not in config and "sg_hidden_units" not in config
    assert f"network: {results['network']}" in done.stdout
    rows = list(csv.DictReader((output_dir / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(20, 201, 20))
    assert [c for c in rows[0] if c.startswith("sg_loss")] == ["sg_loss_1", "sg_loss_2"]
    assert float(rows[-1]["sg_loss_1"]) > 0  # the synthesizers were trained
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["160", "180", "200"]


def _final_state(output_dir: Path, data_dir: Path):
    config = TrainConfig(model="cnn", data_dir=str(data_dir), output_dir=str(output_dir), **RUN)
    checkpointer = Checkpointer(output_dir / "checkpoints")
    try:
        return checkpointer.restore(config, jax.eval_shape(lambda: init_train_state(config)))
    finally:
        checkpointer.close()


def test_sigint_then_resume_equals_the_uninterrupted_run(uninterrupted, cifar_dir, tmp_path):
    reference, _ = uninterrupted
    args = _args(tmp_path, cifar_dir)
    stdout_path = tmp_path.parent / f"{tmp_path.name}-stdout.txt"
    with stdout_path.open("w") as stdout:
        process = subprocess.Popen(
            args, stdout=stdout, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "\nstep " not in stdout_path.read_text():
            time.sleep(0.002)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr
    stopped = json.loads((tmp_path / "results.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["steps_done"] < RUN["num_steps"]

    resumed = subprocess.run(
        [*args, "--resume"], capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stdout
    a, b = (json.loads((d / "results.json").read_text()) for d in (reference, tmp_path))
    assert [r | {"elapsed_s": 0} for r in a["history"]] == [
        r | {"elapsed_s": 0} for r in b["history"]
    ]
    state_a, state_b = (_final_state(d, cifar_dir).state for d in (reference, tmp_path))
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """Case -> (extra flags, words the one error line must hold)."""
    corrupt = tmp / "corrupt"
    archive = write_archive(corrupt / cifar.ARCHIVE, batch_payloads())
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return {
        "zero filters": (["--filters=0"], ("--filters=0",)),
        "zero kernel": (["--kernel_size=0"], ("--kernel_size=0",)),
        "negative pooling floor": (["--pool_min_size=-1"], ("--pool_min_size=-1", "0 or more")),
        "text filters": (["--filters=many"], ("--filters",)),
        "cifar10 without data": (["--dataset=cifar10"], ("cifar-10-python.tar.gz", "--data_dir")),
        "corrupt cifar archive": (
            ["--dataset=cifar10", f"--data_dir={corrupt}"],
            (cifar.ARCHIVE, "truncated"),
        ),
        "an MLP width": (["--hidden_units=32"], ("--hidden_units", "--filters")),
        "zero conv stages": (["--hidden_layers=0"], ("--hidden_layers",)),
    }


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = _bad_inputs(tmp_path)
    output_dir = tmp_path / "out"
    argvs = {
        name: [str(SCRIPT), "--num_steps=20", f"--output_dir={output_dir}", *extra]
        for name, (extra, _) in cases.items()
    }
    done = subprocess.run(
        [sys.executable, __file__, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (_, words) in cases.items():
        code, stderr = outcomes[name]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        assert "Traceback" not in stderr
        for word in words:
            assert word in lines[0], (name, word, lines[0])
    assert not output_dir.exists()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from flag_fuzz import load_script, run_once

    module = load_script(SCRIPT)
    print(
        json.dumps({name: run_once(module, argv) for name, argv in json.loads(sys.argv[1]).items()})
    )
