#!/usr/bin/env bash
# Pretrains on a Cloud TPU pod slice: one process per TPU VM worker, all running the same command.
#
#   export TPU_NAME=simclr-v4-32 ZONE=us-central2-b PROJECT=my-project   # PROJECT: optional
#   export WORKDIR=gs://BUCKET/simclr/r50 DATA_DIR=gs://BUCKET/tensorflow_datasets
#   scripts/tpu_pod.sh create            # the TPU VMs (ACCELERATOR_TYPE, RUNTIME_VERSION, SPOT=1)
#   scripts/tpu_pod.sh setup             # this checkout + Python 3.12 venv + jax[tpu] on every worker
#   scripts/tpu_pod.sh check             # every worker sees the whole slice (jax.distributed)
#   scripts/tpu_pod.sh run [--config.batch_size=4096 ...]   # start pretraining in the background
#   scripts/tpu_pod.sh logs              # follow worker 0's log (Ctrl-C stops following only)
#   scripts/tpu_pod.sh stop              # SIGTERM: checkpoint at a step all workers agree on, exit
#   scripts/tpu_pod.sh delete            # the TPU VMs (checkpoints stay in WORKDIR)
#
# `run` executes on every worker, detached from the ssh session (log: ~/simclr_pretrain.log):
#   cd simclr_jax && SIMCLR_MULTIHOST=1 .venv/bin/python run_pretrain.py --config=$CONFIG \
#       --workdir=$WORKDIR --config.data.data_dir=$DATA_DIR [extra flags]
# SIMCLR_MULTIHOST=1 makes run_pretrain.py call jax.distributed.initialize() with no arguments;
# JAX reads the slice topology from the TPU metadata. WORKDIR must be a bucket that every worker
# writes (Orbax writes each worker's shards there); DATA_DIR holds prepared TFDS datasets (for
# imagenet2012: `tfds build imagenet2012 --data_dir=gs://...` with the manual download files).
# After a preemption or maintenance event, `run` again (recreate and `setup` first if the VMs
# are gone): it resumes from the latest checkpoint in WORKDIR.
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME, e.g. export TPU_NAME=simclr-v4-32}
ZONE=${ZONE:?set ZONE, e.g. export ZONE=us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
# v4 and older: tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite; v5p: v2-alpha-tpuv5;
# v6e: v2-alpha-tpuv6e.
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/imagenet.py}
JAX_VERSION=${JAX_VERSION:-0.12.0}
REMOTE_DIR=simclr_jax  # Relative to the home directory of the ssh user on every worker.
LOG=simclr_pretrain.log
PIDFILE=simclr_pretrain.pid

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

on_workers() {  # on_workers WORKERS COMMAND: runs COMMAND (bash) over ssh on those workers.
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker="$1" --command="$2"
}

quoted() {  # The arguments, each quoted for a remote shell.
  (($# == 0)) || printf ' %q' "$@"
}

create() {
  "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${SPOT:+--spot}
}

setup() {
  # The code: this checkout's files (tracked or untracked, not ignored: no .venv, runs, .git).
  archive=$(mktemp "${TMPDIR:-/tmp}/simclr_jax.XXXXXX")
  trap 'rm -f "$archive"' EXIT
  if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
       while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
       tar -czf "$archive" --null -T -)
  else
    tar -czf "$archive" -C "$repo" --exclude=.venv --exclude=runs --exclude=.git .
  fi
  "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:simclr_jax.tar.gz" "${where[@]}" --worker=all
  # Python 3.12 (the TPU images ship 3.10) from uv, then scripts/setup.sh and the TPU build of JAX.
  on_workers all "set -e
    rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf simclr_jax.tar.gz -C $REMOTE_DIR
    export PATH=\$HOME/.local/bin:\$PATH
    if ! command -v python3.12 >/dev/null; then
      command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
      uv python install 3.12
    fi
    cd $REMOTE_DIR
    PYTHON=\$(command -v python3.12 || uv python find 3.12) bash scripts/setup.sh
    .venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION'"
}

check() {
  on_workers all "cd $REMOTE_DIR && .venv/bin/python -c '
import jax
jax.distributed.initialize()
print(\"process\", jax.process_index(), \"of\", jax.process_count(), \"|\", jax.local_device_count(),
      \"local /\", jax.device_count(), \"global\", jax.devices()[0].device_kind)'"
}

run() {
  : "${WORKDIR:?set WORKDIR=gs://BUCKET/...: checkpoints and metrics, written by every worker}"
  : "${DATA_DIR:?set DATA_DIR=gs://BUCKET/tensorflow_datasets}"
  local args
  args="run_pretrain.py$(quoted "--config=$CONFIG" "--workdir=$WORKDIR" \
    "--config.data.data_dir=$DATA_DIR" "$@")"
  echo "tpu_pod.sh: on every worker: cd $REMOTE_DIR && SIMCLR_MULTIHOST=1 .venv/bin/python $args" >&2
  on_workers all "set -e
    if [ -f ~/$PIDFILE ] && kill -0 \$(cat ~/$PIDFILE) 2>/dev/null; then
      echo \"\$(hostname): already running; 'tpu_pod.sh stop' first\" >&2; exit 1
    fi
    cd $REMOTE_DIR
    SIMCLR_MULTIHOST=1 setsid nohup bash -c 'echo \$\$ > ~/$PIDFILE && exec .venv/bin/python $args' \\
      > ~/$LOG 2>&1 < /dev/null &"
  echo "tpu_pod.sh: started; follow worker 0 with: scripts/tpu_pod.sh logs" >&2
}

logs() {
  on_workers "${WORKER:-0}" "tail -n 100 -F ~/$LOG"
}

stop() {
  # SIGTERM reaches JAX's preemption service: all workers checkpoint the same step, then exit.
  on_workers all "if [ -f ~/$PIDFILE ] && kill -0 \$(cat ~/$PIDFILE) 2>/dev/null; then
      kill -TERM \$(cat ~/$PIDFILE); echo \"\$(hostname): SIGTERM sent\"
      while kill -0 \$(cat ~/$PIDFILE) 2>/dev/null; do sleep 2; done; echo \"\$(hostname): stopped\"
    else echo \"\$(hostname): not running\"; fi"
}

delete() {
  "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
}

case ${1:-} in
  create|setup|check|run|logs|stop|delete) subcommand=$1; shift; "$subcommand" "$@" ;;
  *) sed -n '2,22s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
