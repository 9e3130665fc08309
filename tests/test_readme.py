"""The README's library examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_examples_run() -> None:
    text = README.read_text()
    section = text[text.index("## As a library") : text.index("## Data")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 4
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)  # noqa: S102
    assert namespace["logits"].shape == (32, 10)
    _nnx_stages_trained(namespace)
    _clipping_changes_dni_only_when_it_clips(namespace)
    assert namespace["history"].test_accuracy.shape == (4, 2)
    assert float(namespace["history"].test_accuracy[:, -1].min()) > 0.5


def test_recurrent_library_example_runs() -> None:
    text = README.read_text()
    section = text[text.index("## Recurrent DNI") : text.index("## Layer-parallel training")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    prelude = "import jax\nimport jax.numpy as jnp\nimport optax\nimport sgjax\n"
    exec(compile(prelude + blocks[0], str(README), "exec"), namespace)  # noqa: S102
    assert namespace["carry"][1].shape == (8, 16)
    assert float(namespace["seg_metrics"].count) == 32  # 4 steps x 8 sequences


def _nnx_stages_trained(ns: dict) -> None:
    """The NNX example's claims: the stage given as a function is built from the init key, the
    instance keeps its own parameters whatever the key (the control: it does differ from the
    function-built one), the BatchNorm statistics are the stages' collections."""
    import jax
    import numpy as np

    a, b = (ns["nnx_trainer"].init(jax.random.PRNGKey(k), ns["x"]).stages for k in (0, 1))
    kernels = lambda stages, k: np.asarray(stages[k].params["conv"]["kernel"])  # noqa: E731
    assert np.max(np.abs(kernels(a, 0) - kernels(b, 0))) > 1e-3
    np.testing.assert_array_equal(kernels(a, 1), kernels(b, 1))
    assert set(a[0].collections) == set(a[1].collections) == {"batch_stats"}
    assert ns["nnx_logits"].shape == (32, 10) and float(ns["nnx_metrics"].loss) > 0


def _clipping_changes_dni_only_when_it_clips(ns: dict) -> None:
    """The README's own method: with a threshold no gradient reaches it is DNI exactly (the
    control), with the README's threshold its updates differ from DNI's."""
    import jax
    import numpy as np
    import optax

    import sgjax
    from sgjax.models.mlp import mlp_stages

    def run(method):
        stages = mlp_stages(2, 16, 10)
        trainer = sgjax.Trainer(stages, method, sgjax.cross_entropy, optax.adam(1e-2))
        x = jax.random.uniform(jax.random.PRNGKey(1), (32, 20))
        y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 10)
        state, step = trainer.init(jax.random.PRNGKey(0), x), jax.jit(trainer.step)
        for _ in range(3):
            state, _ = step(state, x, y)
        return np.asarray(jax.tree_util.tree_leaves(state.stages[0].params)[-1])

    synthesizer = sgjax.synthesizers.dense(1, 16)
    plain = run(sgjax.dni(synthesizer))
    np.testing.assert_array_equal(run(ns["clipped_dni"](1e30, synthesizer)), plain)
    assert np.max(np.abs(run(ns["clipped_dni"](0.01, synthesizer)) - plain)) > 1e-6


def test_version_is_the_installed_distributions() -> None:
    import importlib.metadata

    import sgjax

    assert importlib.metadata.version("sgjax") == sgjax.__version__
