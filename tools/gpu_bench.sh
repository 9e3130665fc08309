#!/usr/bin/env bash
# The GPU figures in one command (BUILD_NOTES.md records them):
#
#   tools/gpu_bench.sh OUT_DIR
#
# Runs from the checkout on an offline machine where JAX with CUDA, flax, optax,
# orbax-checkpoint, matplotlib and absl-py are installed (nothing is pip-installed):
#   1. step times of bp, sg (DNI, 2x1024 modules) and cdni (linear), scanned vs Python loop;
#   2. a calibration: 2,000 steps of each mode at the paper's settings, 8 seeds vmapped;
#   3. the paper_500k preset for bp, cdni and the 2x1024 DNI, 8 seeds vmapped, each run
#      shortened (and said so) where 500k steps would not fit GPU_BENCH_RUN_S seconds (70);
#   4. one recurrent update (bptt, dni, dni_aux; truncation 2-5) at the paper's LSTM size.
# Everything (tables, benchmark.json, plots, logs) goes under OUT_DIR; about 6-8 minutes on an H100.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: tools/gpu_bench.sh OUT_DIR" >&2
  exit 2
fi
out=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
run_s=${GPU_BENCH_RUN_S:-70}
seeds=${GPU_BENCH_SEEDS:-8}
# Smaller values only for a smoke test of this script on a CPU:
time_steps=${GPU_BENCH_TIME_STEPS:-1000}
calibration_steps=${GPU_BENCH_CALIBRATION_STEPS:-2000}
full_steps=${GPU_BENCH_FULL_STEPS:-500000}
python=${PYTHON:-python3}

log() { echo "[gpu_bench $(date +%H:%M:%S)] $*" | tee -a "$out/gpu_bench.log"; }

log "device: $($python -c 'import jax; d = jax.devices()[0]; print(d.platform, d.device_kind, jax.device_count())')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$out/gpu_bench.log" 2>&1 || true

log "1/4 step times (paper modules: sg 2x1024, cdni linear)"
$python experiments/step_time.py --modes=bp,sg,cdni --steps="$time_steps" --repeats=3 \
  2>>"$out/gpu_bench.log" | tee "$out/step_time.md"

common=(--preset=paper_500k --num_seeds="$seeds" --loop_steps=0 --compare_separate=false --overwrite)
log "2/4 calibration: $calibration_steps steps per mode, $seeds seeds vmapped"
$python experiments/benchmark.py "${common[@]}" --modes=bp,cdni,sg \
  --num_steps="$calibration_steps" --eval_every="$((calibration_steps / 2))" --output_dir="$out/calibration" >>"$out/gpu_bench.log" 2>&1

log "3/4 paper_500k, $seeds seeds vmapped, at most ${run_s} s of training per mode"
$python tools/gpu_steps.py "$out/calibration/benchmark.json" --budget_s="$run_s" \
  --full_steps="$full_steps" \
  | while IFS=$'\t' read -r mode steps every note; do
      log "$mode: $steps steps, evaluation every $every ($note)"
      $python experiments/benchmark.py "${common[@]}" --modes="$mode" --num_steps="$steps" \
        --eval_every="$every" --output_dir="$out/paper_500k_$mode" >>"$out/gpu_bench.log" 2>&1
      sed -n '1,40p' "$out/paper_500k_$mode/table.md" | tee -a "$out/summary.md"
    done
log "4/4 recurrent DNI: one update of bptt, dni and dni_aux per truncation (LSTM 256, batch 256)"
$python tools/rnn_step_time.py --truncations=2,3,4,5 --steps=50 --repeats=5 \
  2>>"$out/gpu_bench.log" | tee "$out/rnn_step_time.md"
log "done: $out/step_time.md, $out/rnn_step_time.md, $out/summary.md, $out/paper_500k_*/ (table.md, benchmark.json, plots)"
