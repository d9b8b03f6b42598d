#!/usr/bin/env bash
# Runs a program on several GPU hosts: one process per host, each using all of its host's GPUs.
#
#   HOSTS="gpu-0 gpu-1" scripts/gpu_hosts.sh run_pretrain.py --config=configs/imagenet.py \
#       --workdir=/shared/simclr/r50 --config.data.data_dir=/shared/tensorflow_datasets \
#       --config.model.dtype=bfloat16
#
# Host i of HOSTS runs, over ssh, in REMOTE_DIR (default: this checkout's path):
#   .venv/bin/python run_pretrain.py ARGS --coordinator_address=COORDINATOR:PORT \
#       --num_processes=<number of hosts> --process_id=i
# COORDINATOR defaults to the first host's name; set it to an address the other hosts reach it by.
# PORT (default 12355) must be open from every host to the first. Each host needs passwordless ssh,
# the code and a .venv with the CUDA build of JAX (`bash scripts/setup.sh && .venv/bin/pip install
# "jax[cuda13]==0.12.0"`) at REMOTE_DIR. The workdir must be one directory that every host writes
# (NFS, or gs://...): Orbax writes each process's shards there. The data_dir may be shared or a
# copy of the same prepared dataset on each host.
# Output: LOGDIR/host_<i>.log (default ./gpu_hosts_logs). Ctrl-C or SIGTERM sends SIGTERM to every
# process: they checkpoint a step they agree on and exit; rerun the same command to resume. If one
# process fails, the others are killed (they could only wait for it). SSH overrides the ssh command.
set -euo pipefail

read -r -a hosts <<< "${HOSTS:?set HOSTS to the GPU hosts, e.g. HOSTS=\"gpu-0 gpu-1\"}"
(($# >= 1)) || { sed -n '2,21s/^# \{0,1\}//p' "$0" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
remote_dir=${REMOTE_DIR:-$repo}
coordinator=${COORDINATOR:-${hosts[0]}}
port=${PORT:-12355}
logdir=${LOGDIR:-gpu_hosts_logs}
read -r -a ssh <<< "${SSH:-ssh -o BatchMode=yes}"
num=${#hosts[@]}
mkdir -p "$logdir"

pidfile() { echo "/tmp/simclr_jax_${port}_$1.pid"; }  # The remote process's pid, per process id.

signal_all() {  # signal_all SIGNAL: on every host, to the process started there.
  local i kills=()
  for i in "${!hosts[@]}"; do
    # Only if that pid still runs our process (pids are reused once a process is gone).
    "${ssh[@]}" "${hosts[i]}" "pid=\$(cat $(pidfile "$i")) &&
      tr '\\0' '\\n' < /proc/\$pid/cmdline | grep -qx -- --process_id=$i && kill -$1 \$pid" \
      2>/dev/null &
    kills+=($!)
  done
  wait "${kills[@]}" || true
}

stopping=0
# shellcheck disable=SC2317  # Called from the traps below.
on_signal() {
  if ((stopping)); then echo "gpu_hosts.sh: killing all processes." >&2; signal_all KILL; return; fi
  stopping=1
  echo "gpu_hosts.sh: SIGTERM to all $num processes (checkpoint, then exit; again: kill)." >&2
  signal_all TERM
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

ssh_pids=()
for i in "${!hosts[@]}"; do
  args=$(printf ' %q' "$@" "--coordinator_address=$coordinator:$port" "--num_processes=$num" \
         "--process_id=$i")
  "${ssh[@]}" "${hosts[i]}" "cd $(printf %q "$remote_dir") && echo \$\$ > $(pidfile "$i") &&
    exec .venv/bin/python$args" > "$logdir/host_$i.log" 2>&1 < /dev/null &
  ssh_pids+=($!)
  echo "gpu_hosts.sh: process $i on ${hosts[i]}, log $logdir/host_$i.log" >&2
done

status=0
alive=$num
while ((alive > 0)); do
  finished=
  if wait -n -p finished; then rc=0; else rc=$?; fi
  if [[ -z ${finished:-} ]]; then  # A trapped signal interrupted wait, or no job is left.
    ((rc != 127)) || break
    continue
  fi
  [[ " ${ssh_pids[*]} " == *" $finished "* ]] || continue
  alive=$((alive - 1))
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "gpu_hosts.sh: a process exited with status $rc; killing the others." >&2
    stopping=1
    signal_all KILL
  fi
done
exit "$status"
