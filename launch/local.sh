#!/usr/bin/env bash
# Single-process run on this machine: launch/local.sh CONFIG WORKDIR [extra flags...]
#   e.g. launch/local.sh configs/pretrain.py:tiny runs/tiny --config.train.steps=2000
# Multi-process, TPU-pod and SLURM launchers come with the scale-out work.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
shift 2
resume=()
if [ -d "$workdir/checkpoints" ] && [ -n "$(ls -A "$workdir/checkpoints" 2>/dev/null)" ]; then
  resume=(--resume)  # continue an interrupted run instead of refusing the workdir
fi
exec mpma-pretrain --config "$config" --workdir "$workdir" "${resume[@]}" "$@"
