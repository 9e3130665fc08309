#!/usr/bin/env bash
# Start N processes of one command on this machine as one jax.distributed run, and collect their
# exit codes. Usage: tools/launch_local.sh N CMD [ARGS...]
#
# Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port, or $SGJAX_LAUNCH_PORT),
# JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i; pass --distributed to the command so it joins.
# Output lines are prefixed with "[i] ". When one process fails, the others get
# $SGJAX_LAUNCH_GRACE seconds (default 90) to stop by themselves, then SIGTERM, then SIGKILL.
# Exit code: 0 if every process succeeded, else the first failure's code (one line per failure
# on stderr).
set -u

usage() { echo "usage: tools/launch_local.sh N CMD [ARGS...]  (N: processes, 1 to 64)" >&2; exit 2; }
[ $# -ge 2 ] || usage
n=$1; shift
case $n in ''|*[!0-9]*) echo "error: N=$n must be a positive integer" >&2; exit 2;; esac
if [ "$n" -lt 1 ] || [ "$n" -gt 64 ]; then echo "error: N=$n must be between 1 and 64" >&2; exit 2; fi
command -v "$1" >/dev/null 2>&1 || { echo "error: command not found: $1" >&2; exit 2; }

port=${SGJAX_LAUNCH_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
grace=${SGJAX_LAUNCH_GRACE:-90}

pids=()
for ((i = 0; i < n; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i
    exec "$@"
  ) > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
done

stop_all() { for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done; }
trap 'stop_all TERM; exit 130' INT TERM

codes=()
first=0
failed_at=
while :; do
  running=0
  for ((i = 0; i < n; i++)); do
    [ -n "${codes[$i]:-}" ] && continue
    if kill -0 "${pids[$i]}" 2>/dev/null; then running=$((running + 1)); continue; fi
    wait "${pids[$i]}"; code=$?
    codes[$i]=$code
    if [ "$code" -ne 0 ]; then
      echo "launch_local: process $i exited with code $code" >&2
      [ "$first" -eq 0 ] && first=$code
      [ -z "$failed_at" ] && failed_at=$SECONDS
    fi
  done
  [ "$running" -eq 0 ] && break
  if [ -n "$failed_at" ] && [ $((SECONDS - failed_at)) -ge "$grace" ]; then
    echo "launch_local: stopping the $running process(es) still running ${grace} s after a failure" >&2
    stop_all TERM; sleep 5; stop_all KILL
    failed_at=$((SECONDS + 1000000))
  fi
  sleep 0.2
done
wait
exit "$first"
