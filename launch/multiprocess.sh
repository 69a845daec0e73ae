#!/usr/bin/env bash
# Several JAX processes on this one machine, as a multi-host job would run them:
#   launch/multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [flags...]
#   e.g. launch/multiprocess.sh 2 configs/pretrain.py:tiny runs/tiny2 --config.train.steps=200
# Process i runs `mpma-pretrain --coordinator_address=127.0.0.1:PORT --num_processes=N
# --process_id=i` with its share of the devices:
#   GPUs (nvidia-smi lists some, JAX_PLATFORMS is not cpu): CUDA_VISIBLE_DEVICES split evenly
#     (the GPU count, or the list already in CUDA_VISIBLE_DEVICES, must be a multiple of N);
#   otherwise CPU: JAX_PLATFORMS=cpu and DEVICES_PER_PROCESS (default 1) simulated devices each
#     (XLA_FLAGS=--xla_force_host_platform_device_count).
# Logs go to WORKDIR/logs/process_<i>.log. When a process fails, the others get SIGTERM (SIGKILL
# after KILL_AFTER seconds, default 60) and the script exits with the first failure's code.
# Ctrl-C or SIGTERM to this script is passed on as SIGTERM: the processes checkpoint and stop.
# Every process runs with --resume=auto (continue when WORKDIR holds a checkpoint).
# Environment: PORT (default: a free one), DEVICES_PER_PROCESS, KILL_AFTER, and MPMA_PRETRAIN (the
# command to run, default mpma-pretrain).
set -euo pipefail
usage="usage: launch/multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [flags...]"
n=${1:?$usage}
config=${2:?$usage}
workdir=${3:?$usage}
shift 3
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES must be a positive integer, got '$n'; $usage" >&2
  exit 2
fi
read -r -a program <<< "${MPMA_PRETRAIN:-mpma-pretrain}"
free_port() {  # one the OS is not using now
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}
port=${PORT:-$(free_port)}

gpus=()
if [ "${JAX_PLATFORMS:-}" != cpu ] && command -v nvidia-smi >/dev/null 2>&1; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
  else
    # one index per line; none when nvidia-smi is there but no driver
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
  fi
fi
if [ "${#gpus[@]}" -gt 0 ]; then
  if [ $(( ${#gpus[@]} % n )) -ne 0 ]; then
    echo "${#gpus[@]} GPUs (${gpus[*]}) do not split evenly into $n processes" >&2
    exit 2
  fi
  per=$(( ${#gpus[@]} / n ))
else
  per=${DEVICES_PER_PROCESS:-1}
fi

mkdir -p "$workdir/logs"

pids=()
for ((i = 0; i < n; i++)); do
  if [ "${#gpus[@]}" -gt 0 ]; then
    share=$(IFS=,; echo "${gpus[*]:i*per:per}")
    devices=(env "CUDA_VISIBLE_DEVICES=$share")
  else
    devices=(env JAX_PLATFORMS=cpu
             "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$per")
  fi
  "${devices[@]}" "${program[@]}" --config "$config" --workdir "$workdir" --resume=auto \
    --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@" \
    > "$workdir/logs/process_$i.log" 2>&1 &
  pids+=("$!")
done
if [ "${#gpus[@]}" -gt 0 ]; then kind="GPU"; else kind="CPU device"; fi
echo "$n processes x $per $kind(s), coordinator 127.0.0.1:$port; logs in $workdir/logs/" >&2

kill_at=""  # when the processes told to stop get SIGKILL
stop_all() {  # SIGTERM to the processes still running
  for pid in "${pids[@]}"; do
    if [ "$pid" != done ]; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  if [ -z "$kill_at" ]; then kill_at=$((SECONDS + ${KILL_AFTER:-60})); fi
}
trap 'echo "stopping: SIGTERM to every process" >&2; stop_all' INT TERM

# Poll rather than `wait -n`: a trapped signal also ends `wait -n`, indistinguishable from a process
# that exited, and older bash lacks `wait -n -p`.
first_rc=0
running=$n
while [ "$running" -gt 0 ]; do
  running=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [ "$pid" = done ]; then continue; fi
    if kill -0 "$pid" 2>/dev/null; then
      running=$((running + 1))
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[$i]=done
    if [ "$rc" -ne 0 ] && [ "$first_rc" -eq 0 ]; then
      first_rc=$rc
      echo "process $i exited with $rc; stopping the others. The end of its log:" >&2
      tail -n 20 "$workdir/logs/process_$i.log" >&2 || true
      stop_all
    fi
  done
  if [ -n "$kill_at" ] && [ "$SECONDS" -ge "$kill_at" ]; then
    for pid in "${pids[@]}"; do
      if [ "$pid" != done ]; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
  fi
  if [ "$running" -gt 0 ]; then sleep 1; fi
done
exit "$first_rc"
