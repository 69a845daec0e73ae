r"""mpma-eval: the metrics of a fine-tuning run's selected checkpoint, or the whole downstream suite.

  mpma-eval --run FT [--protocol clean] [--split test|select] [--out F]
  mpma-eval --suite --init RUN --data_dir /data/mpma --workdir SUITE --tasks vqa_rad,slake \
      --override train.epochs=1

--run writes RUN/eval_<split>.json (evaluate.evaluate_finetuned). --suite fine-tunes and tests
every task whose dataset is built and prints the Markdown table, also SUITE/suite.md (suite.run).
"""
import json
import os

from absl import app, flags, logging

from mpma_jax import cli, evaluate, overrides, suite

_RUN = flags.DEFINE_string("run", None, "A fine-tuning run directory (mpma-finetune --workdir)")
_PROTOCOL = flags.DEFINE_string("protocol", None,
                                "prior | clean (default: every protocol of the run)")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "select"], "Records to evaluate")
_OUT = flags.DEFINE_string("out", None, "Output JSON (default: RUN/eval_<split>.json)")
_SUITE = flags.DEFINE_bool("suite", False, "Run every task whose dataset is built, print the table")
_INIT = flags.DEFINE_string("init", None,
                            "--suite: the pre-training run (or RUN/checkpoints/<step>)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "--suite: where `mpma-data build` wrote the data")
_WORKDIR = flags.DEFINE_string("workdir", None, "--suite: output directory (one run per task)")
_TASKS = flags.DEFINE_string("tasks", None, "--suite: comma-separated task configs (default all)")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "--suite: key=value set on every task's config (repeatable), e.g. "
    "--override train.epochs=1")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _SUITE.value:
    if not (_INIT.value and _DATA_DIR.value and _WORKDIR.value):
      raise app.UsageError("--suite needs --init (a pre-training run), --data_dir and --workdir")
    tasks = suite.SUITE if not _TASKS.value else tuple(
        t for t in suite.SUITE if t[0] in _TASKS.value.split(","))
    changes = dict(overrides.parse(o) for o in _OVERRIDE.value)
    table, _ = suite.run(_INIT.value, _DATA_DIR.value, _WORKDIR.value, tasks, changes)
    print(table)
    return
  if not _RUN.value:
    raise app.UsageError("give --run FINETUNE_RUN (evaluate its checkpoint) or --suite")
  with open(os.path.join(_RUN.value, "config.json")) as fp:
    protocols = json.load(fp)["protocols"]
  out = {
      p: evaluate.evaluate_finetuned(_RUN.value, p, _SPLIT.value)
      for p in ([_PROTOCOL.value] if _PROTOCOL.value else protocols)
  }
  path = _OUT.value or os.path.join(_RUN.value, f"eval_{_SPLIT.value}.json")
  with open(path, "w") as fp:
    json.dump(out, fp, indent=1)
  print(json.dumps({p: {k: v for k, v in r.items() if isinstance(v, float)} for p, r in out.items()
                   }))


def run():
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
