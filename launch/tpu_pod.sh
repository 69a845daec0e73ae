#!/usr/bin/env bash
# Pre-training on a Cloud TPU VM pod slice: the same mpma-pretrain command on every worker.
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]
#   e.g. launch/tpu_pod.sh my-v4-32 us-central2-b configs/pretrain.py:base gs://bucket/runs/base \
#          --config.data.data_dir=gs://bucket/mpma --config.data.tokenizer=/home/me/roberta-base
# Every worker needs the repository at $REPO_DIR (default mpma-jax, relative to the ssh user's home)
# with its virtualenv in $REPO_DIR/.venv, e.g. set up once with
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command \
#     'git clone URL mpma-jax && cd mpma-jax && python3 -m venv .venv && . .venv/bin/activate &&
#      pip install -e . "jax[tpu]"'
# CONFIG and any local paths in the flags are read on the workers (CONFIG relative to $REPO_DIR).
# WORKDIR must be storage that all workers share: a gs:// bucket or an NFS/Filestore mount.
# mpma-pretrain finds the other workers itself (jax.distributed.initialize() on a TPU pod), and
# only worker 0 prints progress. The job lives as long as this ssh session: run this inside tmux
# or screen. Extra gcloud ssh options (--project, --internal-ip, ...) go in $GCLOUD_SSH_FLAGS.
#
# Every worker runs with --resume=auto: mpma-pretrain continues from the WORKDIR's latest
# checkpoint (gs:// or a shared mount; worker 0 looks and every worker follows it) or starts a new
# run, so the same command restarts the job after a preemption.
set -euo pipefail
usage="usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]"
tpu=${1:?$usage}
zone=${2:?$usage}
config=${3:?$usage}
workdir=${4:?$usage}
shift 4
case "$workdir" in
  gs://* | /*) ;;
  *) echo "WORKDIR '$workdir' is relative: each worker would write its own copy; give a" \
       "gs:// path or an absolute path on a shared mount" >&2
     exit 2 ;;
esac

# One command line for the remote shell; every argument quoted so that it arrives unchanged.
remote="cd $(printf '%q' "${REPO_DIR:-mpma-jax}") && . .venv/bin/activate && mpma-pretrain"
for arg in --config "$config" --workdir "$workdir" --resume=auto "$@"; do
  remote+=" $(printf '%q' "$arg")"
done
read -r -a extra <<< "${GCLOUD_SSH_FLAGS:-}"
echo "on every worker of $tpu: $remote" >&2
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all "${extra[@]}" \
  --command "$remote"
