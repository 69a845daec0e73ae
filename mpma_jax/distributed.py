"""Joining a multi-process job: `jax.distributed.initialize`, automatic on TPU pods and under
SLURM, explicit (coordinator address, process count, process id) anywhere else. Shared by every
command (mpma-pretrain, mpma-finetune), so it defines no flags.
"""
import os

import jax


def detected_cluster() -> str | None:
  """'tpu_pod' or 'slurm' when this process is one of several started by a TPU pod or SLURM."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu_pod"
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  return None


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """jax.distributed.initialize for a multi-process job; nothing for a single process."""
  explicit = [coordinator, num_processes, process_id]
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together; got "
                     f"{coordinator!r}, {num_processes!r}, {process_id!r}")
  # CPU devices exchange collectives through gloo (a no-op setting on GPU and TPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is not None:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif detected_cluster():
    jax.distributed.initialize()  # TPU pod / SLURM: addresses and ids from the environment
