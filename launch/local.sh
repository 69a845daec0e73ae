#!/usr/bin/env bash
# Single-process run on this machine: launch/local.sh CONFIG WORKDIR [extra flags...]
#   e.g. launch/local.sh configs/pretrain.py:tiny runs/tiny --config.train.steps=2000
# Runs with --resume=auto (continue when WORKDIR holds a checkpoint), as every launcher does. The
# other launchers take the same
# CONFIG WORKDIR [flags...] after their own arguments, so any of them can be mpma-sweep's
# --launcher:
#   launch/multiprocess.sh N ...   N processes on this machine (CPU devices or a share of GPUs)
#   sbatch launch/slurm.sbatch ... SLURM, a process per GPU, checkpoint + requeue at the time limit
#   launch/tpu_pod.sh TPU ZONE ... every worker of a Cloud TPU pod slice
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
shift 2
# --resume=auto: continue an interrupted run (a checkpoint exists), else start.
exec mpma-pretrain --config "$config" --workdir "$workdir" --resume=auto "$@"
