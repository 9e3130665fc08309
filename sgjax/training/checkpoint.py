"""Checkpoints with orbax: the whole run state, and as JSON the records, times and the
configuration that made them. Orbax renames a checkpoint's folder only when it is complete, so a
killed process never leaves a half-written one that looks finished."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sgjax.training.config import UNUSED_FIELDS, RunConfig
from sgjax.training.loop import EvalRecord, PeriodMetrics, Resume

CHECKPOINT_FORMAT = 1
KEEP_LAST = 3


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line saying what to do."""


class Checkpointer:
    """A run's checkpoints under ``directory``, a sub-folder per step (state, work in flight,
    records, period sums, times, ``RunConfig.identity``)."""

    def __init__(self, directory: Path, keep_last: int = KEEP_LAST) -> None:
        self.directory = Path(directory).absolute()
        options: dict[str, Any] = {"create": True}
        if jax.process_count() > 1:  # every process has the whole state: process 0 writes, and
            index = jax.process_index()  # any process reads without waiting for the others
            if index == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
            only = ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})
            options = dict(create=False, multiprocessing_options=only)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_last, enable_async_checkpointing=False, **options
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, point: Resume, config: RunConfig, extra: dict[str, Any] | None = None) -> None:
        """Write ``point``, waiting until it is on disk; ``extra``: more a resume must match."""
        meta = {
            "format": CHECKPOINT_FORMAT,
            "config": config.identity() | (extra or {}),
            "records": [dataclasses.asdict(r) for r in point.records],
            "period": dataclasses.asdict(point.period),
            "train_time_s": point.train_time_s,
            "eval_time_s": point.eval_time_s,
            "inflight": sorted(point.inflight or {}),
        }
        state, inflight = point.state, point.inflight
        if jax.process_count() > 1:  # orbax writes host values, not one process's arrays
            state, inflight = jax.device_get((state, inflight))
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if inflight:  # an engine's work in flight (the sg pipeline's), by name
            items["inflight"] = ocp.args.StandardSave(dict(inflight))
        self._manager.save(int(point.state.step), args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def restore(
        self, config: RunConfig, template: Any, step: int | None = None, *,
        extra: dict[str, Any] | None = None, record_type: Any = EvalRecord,
    ) -> Resume:  # fmt: skip
        """Restore ``step`` (default: the latest) into ``template``'s shapes (``jax.eval_shape``
        will do), refusing one made by another ``config.identity() | extra``."""
        step, meta = self.read_meta(step)
        _check_compatible(meta, config.identity() | (extra or {}), self.directory / str(step))
        restored = self.read_state(step, template)
        records = [record_type.from_dict(r) for r in meta["records"]]
        inflight = self.read_inflight(step) if meta.get("inflight") else None
        times = (meta["train_time_s"], meta["eval_time_s"])
        return Resume(restored, records, PeriodMetrics.from_dict(meta["period"]), *times, inflight)

    def read_meta(self, step: int | None = None) -> tuple[int, Any]:  # default: the latest
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return step, self._read(step, "meta", ocp.args.JsonRestore(), "")

    def read_state(self, step: int, template: Any) -> Any:
        sharding = None
        if jax.process_count() > 1:  # read onto this process's first device
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template
        )
        return self._read(
            step, "state", ocp.args.StandardRestore(abstract), "the training state in "
        )

    def read_inflight(self, step: int) -> Any:
        args = ocp.args.Composite(inflight=ocp.args.StandardRestore())
        return self._manager.restore(step, args=args)["inflight"]

    def _read(self, step: int, item: str, args: Any, what: str) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
        except Exception as error:  # orbax raises many kinds; all mean "unreadable"
            text = str(error).strip().splitlines()
            short = (text[0] if text else type(error).__name__)[:200]
            raise CheckpointError(
                f"cannot read {what}checkpoint {self.directory / str(step)} ({short}); delete "
                "it to resume from an earlier one, or start again with --overwrite"
            ) from None

    def close(self) -> None:
        self._manager.close()


def _check_compatible(meta: Any, now: dict[str, Any], where: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{where} is not an sgjax checkpoint of format {CHECKPOINT_FORMAT}; "
            "start again with --overwrite"
        )
    # Checkpoints from before the CNN hold MLPs and no CNN fields.
    saved = {"model": "mlp"} | meta.get("config", {})
    saved = {k: v for k, v in saved.items() if k not in UNUSED_FIELDS.get(saved["model"], ())}
    # A field newer than the checkpoint and off now (False, 0, None) is how it was made.
    saved |= {k: v for k, v in now.items() if k not in saved and not v}
    differences = [
        f"the {saved.get(key)} network (now {now.get(key)})"
        if key == "model"
        else f"--{key}={_flag_value(saved.get(key))} (now {_flag_value(now.get(key))})"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]
    if saved["model"] != now["model"]:  # the other network's fields would only be noise
        differences = [f"the {saved['model']} network (now {now['model']})"]
    if differences:
        raise CheckpointError(
            f"checkpoint {where} was made with {', '.join(differences)}; resume with the same "
            "flags, or start again with --overwrite"
        )


def _flag_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
