#!/usr/bin/env bash
# Runs a program as N JAX processes x M CPU devices on this machine, the way it runs on N hosts.
#
#   scripts/launch_local.sh [-n N] [-d M] [--port P] [--logdir DIR] [--grace S] \
#       run_pretrain.py --workdir=runs/mp [--config=... --config.batch_size=64 ...]
#   scripts/launch_local.sh -n 2 -d 2 run_eval.py --workdir=runs/mp
#
# Every process gets the same arguments plus --coordinator_address=127.0.0.1:P
# --num_processes=N --process_id=i, and JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=M in its
# environment; collectives go over loopback TCP (gloo). Defaults: N=2, M=2, a free port.
# Process 0 prints to this terminal; process i>0 writes DIR/process_i.log (DIR: a new temporary
# directory unless --logdir). The interpreter is $PYTHON, else the repository's .venv.
#
# Stopping: Ctrl-C, or SIGTERM/SIGHUP to this script, sends SIGTERM to every process: pretraining
# saves a checkpoint at a step all processes agree on and exits; rerun the same command to resume.
# A second Ctrl-C, or processes still alive after --grace seconds (default 300), get SIGKILL.
# If a process fails, the others are killed at once: without it they would only wait in
# collectives. If this script is killed with SIGKILL, every process still receives SIGTERM
# (parent-death signal). Exit status: 0 when all processes succeed, else the first failure's.
set -euo pipefail

usage() { sed -n '2,20s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }

num_processes=2
devices=2
port=
logdir=
grace=300
while (($#)); do
  case $1 in
    -n|--num_processes) num_processes=$2; shift 2 ;;
    -d|--devices_per_process) devices=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --logdir) logdir=$2; shift 2 ;;
    --grace) grace=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) echo "launch_local.sh: unknown option $1" >&2; usage 2 >&2 ;;
    *) break ;;
  esac
done
if (($# == 0)); then
  echo "launch_local.sh: missing the program (run_pretrain.py or run_eval.py)" >&2; usage 2 >&2
fi
[[ $num_processes =~ ^[1-9][0-9]*$ && $devices =~ ^[1-9][0-9]*$ ]] ||
  { echo "launch_local.sh: -n and -d must be positive integers" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
program=$1; shift
[[ -f $program ]] || program=$repo/$program  # run_pretrain.py works from any directory.
[[ -f $program ]] || { echo "launch_local.sh: no such program: ${program#"$repo/"}" >&2; exit 2; }
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || python=$(command -v python3)
if [[ -z $port ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if [[ -z $logdir ]]; then
  logdir=$(mktemp -d "${TMPDIR:-/tmp}/launch_local.XXXXXX")
fi
mkdir -p "$logdir"

# setsid: Ctrl-C reaches this script only (which forwards one SIGTERM to every process), never
# the processes directly. setpriv --pdeathsig: SIGTERM to a process when this script dies.
wrapper=(setsid)
if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
  wrapper+=(setpriv --pdeathsig TERM --)
fi

pids=()  # Started and not yet reaped (so their pids cannot have been reused).
signal_all() {  # signal_all SIGNAL: to every such process.
  local pid
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}

stopping=0
killer=
# shellcheck disable=SC2317  # Called from the traps below.
on_signal() {
  if ((stopping)); then
    echo "launch_local.sh: SIG$1 again: killing all processes." >&2
    signal_all KILL
    return
  fi
  stopping=1
  echo "launch_local.sh: SIG$1: sending SIGTERM to all $num_processes processes (they checkpoint" \
       "and stop; SIGKILL in ${grace}s or on a second Ctrl-C)." >&2
  signal_all TERM
  sleep "$grace" & killer=$!
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP
trap 'signal_all KILL' EXIT  # Whatever happens to this script, no process outlives it.

echo "launch_local.sh: $num_processes processes x $devices CPU devices, coordinator" \
     "127.0.0.1:$port; logs of processes 1..$((num_processes - 1)) in $logdir" >&2
for ((i = 0; i < num_processes; i++)); do
  args=("$program" "$@" "--coordinator_address=127.0.0.1:$port"
        "--num_processes=$num_processes" "--process_id=$i")
  if ((i == 0)); then
    JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices "${wrapper[@]}" "$python" "${args[@]}" &
  else
    JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices "${wrapper[@]}" "$python" "${args[@]}" \
      > "$logdir/process_$i.log" 2>&1 < /dev/null &
  fi
  pids+=($!)
done
started=("${pids[@]}")

status=0
alive=$num_processes
while ((alive > 0)); do
  finished=
  if wait -n -p finished; then rc=0; else rc=$?; fi
  if [[ -z ${finished:-} ]]; then  # A trapped signal interrupted wait, or no job is left.
    ((rc != 127)) || break
    continue
  fi
  if [[ $finished == "$killer" ]]; then
    echo "launch_local.sh: processes still running ${grace}s after SIGTERM: killing them." >&2
    signal_all KILL
    killer=
    continue
  fi
  alive=$((alive - 1))
  for ((i = 0; i < num_processes; i++)); do
    [[ ${started[i]} == "$finished" ]] && break
  done
  remaining=()  # Reaped: never signal that pid again.
  for pid in "${pids[@]}"; do [[ $pid == "$finished" ]] || remaining+=("$pid"); done
  pids=("${remaining[@]}")
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "launch_local.sh: process $i exited with status $rc; killing the others" \
         "(log: $( ((i == 0)) && echo 'above' || echo "$logdir/process_$i.log"))." >&2
    stopping=1
    signal_all KILL
  fi
done
[[ -z $killer ]] || kill "$killer" 2>/dev/null || true
exit "$status"
