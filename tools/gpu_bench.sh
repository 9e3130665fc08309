#!/usr/bin/env bash
# The GPU figures in one window (about 13 minutes on one H100; BUILD_NOTES.md records them):
#
#   tools/gpu_bench.sh OUT_DIR
#
# Runs from the checkout on an offline machine where JAX with CUDA, flax, optax,
# orbax-checkpoint, matplotlib and absl-py are installed (nothing is pip-installed). In order of
# priority, each folder in the layout that tools/results_page.py reads (OUT_DIR/feedforward, rnn,
# grid), each with command.txt, stopping any step that would overrun GPU_BENCH_TOTAL_S (780):
#   1. calibration: 1,000 steps of bp, sg (DNI 2x1024), cdni and zero_grad, 8 seeds vmapped;
#   2. the seed's Tables 1-2 (paper_500k: bp, sg, cdni and the zero-gradient control, 8 seeds
#      vmapped), every mode at one step count: 500k, or shortened (and said so) to fit
#      GPU_BENCH_RUN_S (240) seconds of training for all four;
#   3. Repeat Copy at T = 3 at the paper's size (LSTM 256: BPTT, DNI, DNI+Aux, 3 seeds),
#      GPU_BENCH_RNN_STEPS (20,000; the paper's 100k shortened) updates;
#   4. the MNIST CNN at depths 3-4 with 64 filters (bp, sg, cdni, zero_grad, 3 seeds),
#      GPU_BENCH_CNN_STEPS (5,000) steps;
#   5. step times of bp, sg and cdni, scanned against a Python loop;
#   6. docs-style results page: OUT_DIR/results.md (tools/results_page.py).
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
total_s=${GPU_BENCH_TOTAL_S:-780}
run_s=${GPU_BENCH_RUN_S:-240}
seeds=${GPU_BENCH_SEEDS:-8}
rnn_steps=${GPU_BENCH_RNN_STEPS:-20000}
cnn_steps=${GPU_BENCH_CNN_STEPS:-5000}
# Smaller values only for a smoke test of this script on a CPU:
calibration_steps=${GPU_BENCH_CALIBRATION_STEPS:-1000}
full_steps=${GPU_BENCH_FULL_STEPS:-500000}
time_steps=${GPU_BENCH_TIME_STEPS:-1000}
python=${PYTHON:-python3}
start=$(date +%s)

log() { echo "[gpu_bench $(date +%H:%M:%S)] $*" | tee -a "$out/gpu_bench.log"; }
left() { echo $((total_s - ($(date +%s) - start))); }

# run NAME COMMAND...: COMMAND into OUT/NAME with command.txt, stopped (SIGTERM: the benchmark
# writes what it finished) when the window closes.
run() {
  local name=$1
  shift
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 30 ]; then
    log "$name: skipped, ${remaining} s left of the ${total_s} s window"
    return 0
  fi
  mkdir -p "$out/$name"
  echo "python $* --output_dir=$name" >"$out/$name/command.txt"
  log "$name ($remaining s left): python $*"
  timeout --signal=TERM --kill-after=90 "$remaining" \
    $python "$@" --output_dir="$out/$name" --overwrite >>"$out/gpu_bench.log" 2>&1 \
    || log "$name: ended with exit $? (see gpu_bench.log)"
}

log "device: $($python -c 'import jax; d = jax.devices()[0]; print(d.platform, d.device_kind, jax.device_count())')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$out/gpu_bench.log" 2>&1 || true

ff=(--preset=paper_500k --num_seeds="$seeds" --loop_steps=0 --compare_separate=false)
run calibration experiments/benchmark.py "${ff[@]}" --modes=bp,sg,cdni,zero_grad \
  --num_steps="$calibration_steps" --eval_every="$((calibration_steps / 2))"
if [ -f "$out/calibration/benchmark.json" ]; then
  IFS=$'\t' read -r _ steps every note < <($python tools/gpu_steps.py \
    "$out/calibration/benchmark.json" --together --budget_s="$run_s" --full_steps="$full_steps")
  log "tables 1-2: $steps steps for every mode, evaluation every $every ($note)"
  run feedforward experiments/benchmark.py "${ff[@]}" --modes=bp,sg,cdni,zero_grad \
    --num_steps="$steps" --eval_every="$every"
  echo "$note" >"$out/feedforward/shortened.txt"
fi
run rnn experiments/benchmark.py --preset=paper_rnn_t3 --num_steps="$rnn_steps"
run grid experiments/benchmark.py --preset=paper_grid --sweep=model=cnn --sweep=hidden_layers=2,3 \
  --modes=bp,sg,cdni,zero_grad --num_steps="$cnn_steps" --eval_every="$((cnn_steps / 5))"
if [ "$(left)" -gt 60 ]; then
  log "step times (paper modules: sg 2x1024, cdni linear)"
  $python experiments/step_time.py --modes=bp,sg,cdni --steps="$time_steps" --repeats=3 \
    2>>"$out/gpu_bench.log" | tee "$out/step_time.md" || true
fi
$python tools/results_page.py "$out" --gpu="$out" --out="$out/page" >>"$out/gpu_bench.log" 2>&1 || true
log "done in $(($(date +%s) - start)) s: $out/{feedforward,rnn,grid}/, $out/step_time.md, $out/page/results.md"
