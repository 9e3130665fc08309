#!/usr/bin/env bash
# The results page's CPU runs, each into its own folder, then the page itself:
#
#   tools/results.sh RUNS_DIR [EXPERIMENT ...]
#
# EXPERIMENT is any of: feedforward stale_mnist stale_fashion_mnist grid rnn update_prob (default:
# all, in that order; about an hour and a half on an idle 2-core CPU). Each folder gets command.txt (the exact command that
# made it) beside the benchmark's own files; a folder whose command finished is kept, so a stopped
# run continues with the experiments it had not done. Then tools/results_page.py writes
# docs/results.md and docs/figures/ from RUNS_DIR (and from RUNS_DIR/../gpu when it exists).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: tools/results.sh RUNS_DIR [feedforward|stale_mnist|stale_fashion_mnist|grid|rnn|update_prob ...]" >&2
  exit 2
fi
runs=$1
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$runs"
runs=$(cd "$runs" && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
experiments=("$@")
[ ${#experiments[@]} -eq 0 ] && experiments=(feedforward stale_mnist stale_fashion_mnist grid rnn update_prob)

command_for() {
  case $1 in
    feedforward) echo "experiments/benchmark.py --preset=quick --modes=bp,sg,cdni,zero_grad,stale_grad,stale_grad_example,dgl,bp_lambda,sg_unlock,cdni_unlock --num_steps=3000 --eval_every=250 --num_seeds=3 --compare_separate=false --loop_steps=0" ;;
    stale_*) echo "experiments/benchmark.py --preset=quick --dataset=${1#stale_} --hidden_units=128 --sg_hidden_units=128 --modes=bp,sg,zero_grad,stale_grad,stale_grad_example --sweep=stale_decay=0.9,0.99,0.999,0.9999 --num_steps=1500 --eval_every=500 --num_seeds=3 --compare_separate=false --loop_steps=0" ;;
    grid) echo "experiments/benchmark.py --preset=paper_grid_quick" ;;
    rnn) echo "experiments/benchmark.py --preset=paper_rnn_quick" ;;
    update_prob) echo "experiments/benchmark.py --preset=update_prob_sweep" ;;
    *) echo "tools/results.sh: unknown experiment '$1' (feedforward, stale_mnist, stale_fashion_mnist, grid, rnn, update_prob)" >&2; return 2 ;;
  esac
}

for name in "${experiments[@]}"; do
  command=$(command_for "$name")
  folder="$runs/${name/stale_/stale/}"
  if [ -f "$folder/command.txt" ] && [ "$(cat "$folder/command.txt")" = "python $command --output_dir=${name/stale_/stale/}" ]; then
    echo "[results] $name: done before, kept ($folder)"
    continue
  fi
  echo "[results $(date +%H:%M:%S)] $name: python $command"
  mkdir -p "$folder"
  # shellcheck disable=SC2086  # the command is a list of words
  $python $command --output_dir="$folder" --overwrite 2>&1 | tee "$folder/log.txt"
  echo "python $command --output_dir=${name/stale_/stale/}" >"$folder/command.txt"
done
$python tools/results_page.py "$runs"
