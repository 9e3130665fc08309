#!/usr/bin/env bash
# Start N processes of one command on this machine as one jax.distributed run, and collect their
# exit codes. Usage: tools/launch_local.sh N CMD [ARGS...]
#
# Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port, or $SGJAX_LAUNCH_PORT),
# JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i; pass --distributed to the command so it joins.
# Output lines are prefixed with "[i] ". When one process fails, the others get
# $SGJAX_LAUNCH_GRACE seconds (default 90) to end by themselves (a --distributed run ends them
# within about --distributed_timeout), then SIGTERM, then SIGKILL.
# Exit code: 0 if every process succeeded; else the status of the process that failed first
# (128 + the signal's number if a signal killed it), and one line on stderr, once every process
# has ended, naming that process and how it failed (exit code N, or killed by signal SIGNAME),
# e.g. "launch_local: process 0 of 2 failed first: killed by signal SIGKILL; then process 1:
# killed by signal SIGABRT".
# Needs bash 5.1 or newer (wait -n -p: which process ended first).
set -u
if [ "${BASH_VERSINFO[0]}" -lt 5 ] || { [ "${BASH_VERSINFO[0]}" -eq 5 ] && [ "${BASH_VERSINFO[1]}" -lt 1 ]; }; then
  echo "error: tools/launch_local.sh needs bash 5.1 or newer (this is $BASH_VERSION)" >&2; exit 2
fi

usage() { echo "usage: tools/launch_local.sh N CMD [ARGS...]  (N: processes, 1 to 64)" >&2; exit 2; }
[ $# -ge 2 ] || usage
n=$1; shift
case $n in ''|*[!0-9]*) echo "error: N=$n must be a positive integer" >&2; exit 2;; esac
if [ "$n" -lt 1 ] || [ "$n" -gt 64 ]; then echo "error: N=$n must be between 1 and 64" >&2; exit 2; fi
command -v "$1" >/dev/null 2>&1 || { echo "error: command not found: $1" >&2; exit 2; }

port=${SGJAX_LAUNCH_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
grace=${SGJAX_LAUNCH_GRACE:-90}
fifos=$(mktemp -d)
trap 'rm -rf "$fifos"' EXIT

# Each process writes into two FIFOs read by this script's own children (sed, which prefix the
# lines), so that every line is out before the summary line.
pids=() readers=()
for ((i = 0; i < n; i++)); do
  mkfifo "$fifos/out$i" "$fifos/err$i"
  (trap '' INT TERM; exec sed -u "s/^/[$i] /" <"$fifos/out$i") &  # Ctrl-C: the last lines too
  readers+=($!)
  (trap '' INT TERM; exec sed -u "s/^/[$i] /" <"$fifos/err$i" >&2) &
  readers+=($!)
  (
    export JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i
    exec "$@"
  ) >"$fifos/out$i" 2>"$fifos/err$i" &
  pids+=($!)
done

stop_all() { for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done; }
trap 'stop_all TERM; exit 130' INT TERM

how() {  # how=how a process ended, from its status $1 (no subshell: see below)
  if [ "$1" -gt 128 ]; then
    how=$(( $1 - 128 ))
    how="killed by signal SIG$(kill -l "$how" 2>/dev/null || echo "$how")"
  else
    how="exit code $1"
  fi
}

declare -A index
for ((i = 0; i < n; i++)); do index[${pids[$i]}]=$i; done
left=("${pids[@]}")
first= first_code=0 first_how= then= timer= stage=grace
ended_now() {  # ended=the next process that ended (the first to end, when wait -n knows it)
  ended=
  wait -n -p ended "${left[@]}" ${timer:+"$timer"} 2>/dev/null; code=$?
  [ -n "${ended:-}" ] && return
  # bash forgets a job that ended while it ran something else: find it by hand.
  for pid in "${left[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then ended=$pid; wait "$pid" 2>/dev/null; code=$?; return; fi
  done
}
while [ ${#left[@]} -gt 0 ]; do
  ended_now
  [ -n "${ended:-}" ] || continue  # a signal interrupted the wait
  if [ "$ended" = "${timer:-}" ]; then  # the grace period (then 5 s more) is over
    if [ "$stage" = grace ]; then
      echo "launch_local: stopping the ${#left[@]} process(es) still running ${grace} s after process $first failed" >&2
      stop_all TERM; stage=term
      sleep 5 & timer=$!
    else
      stop_all KILL; timer=
    fi
    continue
  fi
  i=${index[$ended]}
  remaining=()
  for pid in "${left[@]}"; do [ "$pid" = "$ended" ] || remaining+=("$pid"); done
  left=("${remaining[@]}")
  [ "$code" -eq 0 ] && continue
  how "$code"
  if [ -z "$first" ]; then
    first=$i first_code=$code first_how=$how
    if [ ${#left[@]} -gt 0 ]; then sleep "$grace" & timer=$!; fi
  else
    then="$then; then process $i: $how"
  fi
done
[ -n "$timer" ] && kill "$timer" 2>/dev/null
# The last lines (bounded: a process's orphaned child may hold its output open).
(sleep 2; kill "${readers[@]}" 2>/dev/null) &
killer=$!
wait "${readers[@]}" 2>/dev/null
kill "$killer" 2>/dev/null
if [ -n "$first" ]; then
  echo "launch_local: process $first of $n failed first: $first_how$then" >&2
fi
exit "$first_code"
