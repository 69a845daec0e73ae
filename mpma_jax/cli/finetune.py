r"""mpma-finetune: fine-tune a pre-trained MPMA on a downstream task and test it (finetune.finetune).

  mpma-finetune --config finetune/vqa_rad.py --init RUN --workdir FT --data_dir /data/mpma
  mpma-finetune --config configs/finetune/chexpert.py:probe_10 --init RUN/checkpoints/2000 \
      --workdir FT --config.train.epochs=3

Writes <workdir>/results.json (and per protocol checkpoints, plan.json, metrics.jsonl).
"""
from absl import flags, logging
from ml_collections import config_flags

from mpma_jax import cli, distributed, finetune

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Task config, e.g. configs/finetune/vqa_rad.py (--config.a.b=v overrides)",
    lock_config=True)
_INIT = flags.DEFINE_string("init", None, "Pre-training run directory or RUN/checkpoints/<step>")
_WORKDIR = flags.DEFINE_string("workdir", None, "Fine-tuning run directory")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Where `mpma-data build` wrote the dataset "
    "(overrides config.data_dir)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process: HOST:PORT of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index")
flags.mark_flags_as_required(["config", "init", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  if _DATA_DIR.value:
    config.data_dir = _DATA_DIR.value
  finetune.finetune(config, _INIT.value, _WORKDIR.value)


def run():
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
