"""mpma-pretrain: pre-train MPMA on image-report pairs (train.pretrain).

  mpma-pretrain --config configs/pretrain.py:tiny --workdir /tmp/mpma_tiny
  mpma-pretrain --config pretrain.py:base --workdir RUN --resume --config.train.steps=20000
  mpma-pretrain --config pretrain.py:base --workdir RUN --resume=auto   # what the launchers run

Joins the other processes of a multi-host job first (automatic on TPU pods and under SLURM,
explicit with --coordinator_address/--num_processes/--process_id otherwise). Every process runs
this same command; the workdir must be on storage that all of them see. Prints one JSON line.
"""
import json
import signal
import sys

from absl import flags, logging
from ml_collections import config_flags

from mpma_jax import cli, distributed, train, validate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pre-training config, e.g. configs/pretrain.py:tiny (--config.a.b=v overrides)",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, eval.json")


class _ResumeParser(flags.ArgumentParser):
  """--resume (= true), --noresume, --resume=true|false|auto."""
  def parse(self, argument):
    value = str(argument).strip().lower()
    if value in ("auto", "true", "false", "1", "0"):
      return {"1": "true", "0": "false"}.get(value, value)
    raise ValueError(f"expected true, false or auto, got {argument!r}")

  def flag_type(self):
    return "true | false | auto"


_RESUME = flags.DEFINE_flag(
    flags.Flag(
        _ResumeParser(), flags.ArgumentSerializer(), "resume", "false",
        "Continue from the latest checkpoint in --workdir; auto: continue if there is one, "
        "else start (the launchers' mode)", boolean=True))
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a multi-process run outside TPU pods "
    "and SLURM (which are detected); with --num_processes and --process_id")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (explicit mode)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit mode)")
flags.mark_flags_as_required(["config", "workdir"])


class _Terminated(Exception):
  """SIGTERM outside the training loop (which saves a checkpoint and stops cleanly on its own)."""


def _raise_terminated(signum, frame):
  del signum, frame
  raise _Terminated()


def main(argv):
  del argv
  signal.signal(signal.SIGTERM, _raise_terminated)  # the loop's own handler replaces it there
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    resume = {"true": True, "false": False, "auto": "auto"}[_RESUME.value]
    result = train.pretrain(_CONFIG.value, _WORKDIR.value, resume=resume)
  except validate.UsageError as e:
    print(f"mpma-pretrain: {e}", file=sys.stderr)
    sys.exit(2)
  except _Terminated:
    print(
        f"mpma-pretrain: stopped by SIGTERM outside the training loop (setup or the final "
        f"evaluation); the checkpoints in {_WORKDIR.value} are intact: run the same command "
        "with --resume=auto to continue", file=sys.stderr)
    sys.exit(128 + signal.SIGTERM)
  if "stopped_at" in result:  # SIGTERM or train.run_steps: a clean stop with a checkpoint
    print(json.dumps(result))
    sys.exit(0)
  i2t5, chance5 = result["trained"]["i2t_r5"], result["chance"]["i2t_r5"]
  print(json.dumps({"i2t_r5": i2t5, "chance_r5": chance5, "ratio_to_chance": i2t5 / chance5}))


def run():
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
