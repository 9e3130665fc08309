"""The layer-parallel sg pipeline runs the CNN unchanged: on 4 simulated CPU devices it computes
what its 1-device run computes.

This file runs itself as a script in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must be set before JAX starts) and
prints one JSON object that the test checks.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from local_processes import script_json

from sgjax.data.sources import Dataset, load_dataset
from sgjax.parallel.layers import train_layer_parallel
from sgjax.training.config import TrainConfig
from sgjax.training.loop import init_train_state

# Three conv stages and the classifier: 4 pipeline stages; cdni with one hidden (BatchNorm) conv
# layer in each synthesizer, so labels and statistics must flow right.
CONFIG = dict(
    mode="cdni",
    model="cnn",
    hidden_layers=3,
    filters=4,
    kernel_size=3,
    sg_hidden_layers=1,
    batch_size=16,
    learning_rate=1e-2,
    num_steps=12,
    eval_every=4,
)
TEST_IMAGES = 500


def _max_difference(a: Any, b: Any) -> float:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _moved(a: Any, b: Any) -> bool:
    return all(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _params(model: Any) -> list:
    return [s.params for s in (*model.stages, *model.synthesizers)]


def four_device_results() -> dict[str, Any]:
    assert len(jax.devices()) == 4, jax.devices()
    mnist = load_dataset("mnist", None)
    small = Dataset(
        mnist.name,
        mnist.source,
        mnist.reason,
        mnist.train_images,
        mnist.train_labels,
        mnist.test_images[:TEST_IMAGES],
        mnist.test_labels[:TEST_IMAGES],
    )
    config = TrainConfig(**CONFIG)
    runs = {
        n: train_layer_parallel(
            config, small, kind="sg_pipeline", num_devices=n, log=lambda _: None
        )
        for n in (4, 1)
    }

    def records(n: int) -> list[dict]:
        return [dataclasses.asdict(r) | {"elapsed_s": 0} for r in runs[n].records]

    initial = init_train_state(config).model
    return {
        "placement": {n: list(r.stage_devices) for n, r in runs.items()},
        "status": [r.status for r in runs.values()],
        "difference": _max_difference(runs[4].state.model, runs[1].state.model),
        "records_equal": records(4) == records(1),
        "moved": _moved(_params(runs[4].state.model), _params(initial)),
        "accuracy": runs[4].records[-1].test_accuracy,
    }


def test_cnn_sg_pipeline_on_four_devices_equals_one_device():
    out = script_json(__file__, 4)
    assert out["placement"] == {"4": [0, 1, 2, 3], "1": [0, 0, 0, 0]}
    assert out["status"] == ["completed", "completed"]
    assert out["difference"] <= 1e-6, out
    assert out["records_equal"]
    assert out["moved"]  # every parameter of every stage and synthesizer trained


if __name__ == "__main__":
    print(json.dumps(four_device_results()))
