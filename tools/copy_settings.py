"""Issue 19 part 3: DNI against truncated BPTT on Copy under the settings not tried before
(--sg_trains_core, a lower synthesizer learning rate with clipping, the unscaled bootstrapped
target, a forget-gate bias of 1, a wider core), alone and combined; seeds vmapped (``run_cell``).

  python tools/copy_settings.py --steps=10000 --seeds=3 --only=base,dni,sg_trains_core
  python tools/copy_settings.py --list
  python tools/copy_settings.py --table=copy_settings.jsonl  # the results as a markdown table

Prints one line per configuration (largest Copy episode solved per seed, the paper's count) and
appends it as JSON to --out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from sgjax.bench.names import markdown_table
from sgjax.bench.rnn_table import run_cell
from sgjax.recurrent.config import RNNConfig

BASE = dict(task="copy", hidden_units=64, batch_size=32, bits=2, max_length=64, truncation=2,
            learning_rate=1e-3)  # fmt: skip
CORE = dict(forget_bias=1.0, clip_norm=1.0)  # settings BPTT can use too
SG_LOW = dict(synthesizer_learning_rate=1e-4, clip_norm=1.0)
ALL = dict(sg_trains_core=True, unscaled_target=True, forget_bias=1.0, **SG_LOW)
CONFIGS: dict[str, dict] = {
    "bptt": dict(mode="bptt"),
    "dni": dict(mode="dni"),
    "sg_trains_core": dict(mode="dni", sg_trains_core=True),
    "sg_lr_1e-4_clip_1": dict(mode="dni", **SG_LOW),
    "unscaled_target": dict(mode="dni", unscaled_target=True),
    "forget_bias_1": dict(mode="dni", forget_bias=1.0),
    "bptt_forget_bias_1": dict(mode="bptt", forget_bias=1.0),
    "bptt_forget_bias_1_clip_1": dict(mode="bptt", **CORE),
    "trains_core+unscaled": dict(mode="dni", sg_trains_core=True, unscaled_target=True),
    "trains_core+sg_lr": dict(mode="dni", sg_trains_core=True, **SG_LOW),
    "all": dict(mode="dni", **ALL),
    "all_sg_scale_1": dict(mode="dni", sg_scale=1.0, **ALL),
    "bptt_128": dict(mode="bptt", hidden_units=128),
    "dni_128": dict(mode="dni", hidden_units=128),
    "all_128": dict(mode="dni", hidden_units=128, **ALL),
    "bptt_128_core": dict(mode="bptt", hidden_units=128, **CORE),
}


def table_row(row: dict) -> list:
    c = row["config"]
    shown = {"sg_trains_core": "sg_trains_core", "unscaled_target": "unscaled target",
             "synthesizer_learning_rate": "M's Adam {:g}", "clip_norm": "clip {:g}",
             "forget_bias": "forget bias {:g}", "sg_scale": "sg_scale {:g}"}  # fmt: skip
    settings = ", ".join(text.format(c[k]) for k, text in shown.items() if k in c) or "-"
    solved = ", ".join(map(str, row["solved"]))
    mode = c["mode"].replace("bptt", "BPTT").replace("dni", "DNI")
    return [c["hidden_units"], c["bits"], c["truncation"], row["steps"], mode, settings, solved,
            row["run_s"]]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--set", default="", help="overrides of BASE, e.g. bits=8,truncation=3")
    parser.add_argument("--out", default="copy_settings.jsonl")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--table", default="", help="print the rows of these jsonl files")
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in CONFIGS.items()))
        return
    if args.table:
        print("\n".join(markdown_table(
            ["LSTM", "bits", "T", "updates", "mode", "settings", "solved (seeds 0-2)", "run s"],
            map(table_row, (json.loads(line) for f in args.table.split(",") for line in open(f))),
        )))  # fmt: skip
        return
    base = dict(BASE)
    for item in filter(None, args.set.split(",")):
        key, value = item.split("=")
        base[key] = type(BASE[key])(value) if key in BASE else float(value)
    for name in args.only.split(","):
        config = RNNConfig(**(base | CONFIGS[name] | {"num_steps": args.steps})).validate()
        start = time.perf_counter()
        cell = run_cell(config, list(range(args.seeds)), count_flops=False)
        row = {"name": name, "solved": cell.solved, "steps": args.steps, "compile_s":
               round(cell.compile_s, 1), "run_s": round(cell.run_s, 1),
               "wall_s": round(time.perf_counter() - start, 1),
               "config": {k: v for k, v in dataclasses.asdict(config).items()
                          if v != getattr(RNNConfig(), k) or k in (*BASE, "mode")}}  # fmt: skip
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
