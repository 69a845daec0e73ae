"""`mpma-pretrain --config configs/pretrain.py:tiny --workdir DIR [--resume]`

Joins the other processes of a multi-host job (`jax.distributed.initialize`: automatic on TPU pods
and under SLURM, explicit with --coordinator_address/--num_processes/--process_id otherwise),
prepares the workdir (tokenizer, config), then runs `train.train_and_evaluate`. Every process runs
this same command; the workdir must be on storage that all of them see.
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mpma_jax.data import pipeline
from mpma_jax.distributed import initialize_distributed
from mpma_jax.interop import pretrained

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, eval.json")
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a multi-process run outside TPU pods "
    "and SLURM (which are detected); with --num_processes and --process_id")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (explicit mode)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit mode)")
flags.mark_flags_as_required(["config", "workdir"])


def prepare_tokenizer(config, workdir: str, data_dir: str):
  """The run's tokenizer, saved in (or read from) <workdir>/tokenizer so a resumed run or an export
  sees exactly the same ids. Returns (tokenizer, directory)."""
  from mpma_jax.data import tokenizer as tokenizers  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  run_dir = os.path.join(workdir, "tokenizer")
  # Process 0 writes the run's tokenizer (training one is not repeatable, so exactly one process
  # may do it); the others wait for it and read the same files.
  if jax.process_index() == 0 and not os.path.isdir(run_dir):
    if config.data.tokenizer == "builtin":  # WordPiece trained on (up to 20k) training texts
      corpus = pipeline.report_corpus(config, data_dir, 20_000)
      tokenizers.train_wordpiece(corpus, config.data.tokenizer_vocab, run_dir)
    else:
      tokenizers.load_tokenizer(config.data.tokenizer).save_pretrained(run_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mpma_jax: tokenizer written")
  tok = tokenizers.load_tokenizer(run_dir)
  check_tokenizer(tok, config)
  return tok, run_dir


def check_tokenizer(tok, config) -> None:
  text = config.model.text
  if len(tok) > text.vocab_size:
    raise ValueError(f"the tokenizer has {len(tok)} tokens but model.text.vocab_size is "
                     f"{text.vocab_size}; raise model.text.vocab_size")
  if tok.pad_token_id != text.pad_id:
    raise ValueError(f"the tokenizer's pad token id is {tok.pad_token_id} but model.text.pad_id "
                     f"is {text.pad_id}; set --config.model.text.pad_id={tok.pad_token_id}")
  if tok.mask_token_id is None:
    raise ValueError("the tokenizer has no mask token, which MLM needs")
  need = config.data.max_len + (text.pad_id + 1 if text.position_style == "roberta" else 0)
  if need > text.max_positions:
    raise ValueError(f"data.max_len={config.data.max_len} needs {need} position embeddings but "
                     f"model.text.max_positions is {text.max_positions}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax  # pylint: disable=g-import-not-at-top
  from mpma_jax import train  # pylint: disable=g-import-not-at-top
  config, workdir = _CONFIG.value, _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  for change in pretrained.adapt_config(config):  # init.* checkpoints set the encoder sizes
    print(f"config: {change}")
  data_dir = pipeline.data_dir_for(config, workdir)
  pipeline.prepare(config, data_dir)  # a wrong dataset name or data_dir fails here, before any work
  tok, tok_dir = prepare_tokenizer(config, workdir, data_dir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  result = train.train_and_evaluate(config, workdir, tok, tok_dir, data_dir, resume=_RESUME.value)
  if "stopped_at" in result:  # SIGTERM or train.run_steps: a clean stop with a checkpoint
    print(json.dumps(result))
    sys.exit(0)
  i2t5, chance5 = result["trained"]["i2t_r5"], result["chance"]["i2t_r5"]
  print(json.dumps({"i2t_r5": i2t5, "chance_r5": chance5, "ratio_to_chance": i2t5 / chance5}))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
