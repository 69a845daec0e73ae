"""The ablation study in one command: pre-training, the downstream suite, the results table.

The study is mpma_jax/ablation.py; its arms, seeds and tasks are in configs/ablations.py; how to
run and read it is in docs/ablations.md.

  python benchmarks/ablations.py --workdir runs/ablations [--variant tiny] [--steps N]
      [--epochs N] [--arms mpma,m3ae,...] [--seeds 0,1] [--tasks synthetic_vqa,...]
      [--synthetic TRAIN,EVAL] [--data_dir D] [--set field=value ...]
      [--finetune_set field=value ...] [--out docs/ablations.md]

Pre-trains every arm with every seed (a finished run is skipped, an interrupted one resumed), runs
the downstream suite on each finished run with the clean protocol (a finished task is skipped),
writes WORKDIR/ablations.json and the results section of --out, and prints that section. Run the
same command again to continue an interrupted study. --data_dir (default WORKDIR/data) holds the
synthetic pre-training set, the generated downstream sets, and any dataset built there with
`mpma-data build` (VQA-RAD joins the study when it is built). Compiled programs are cached in
WORKDIR/xla_cache (unless JAX already has a cache directory), so that runs of the same shapes
reuse them.
"""
import argparse
import os
import signal
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from mpma_jax import ablation, cli, overrides
from mpma_jax.configs import ablations as study

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                           "ablations.md")


def _names(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="study root: one run directory per arm and seed")
  p.add_argument("--variant", default="tiny", help="variant of configs/pretrain.py")
  p.add_argument("--steps", type=int, default=0, help="pre-training steps (0: the variant's)")
  p.add_argument("--epochs", type=int, default=0,
                 help=f"fine-tuning epochs (0: {study.FINETUNE['train.epochs']})")
  p.add_argument("--arms", default=",".join(study.arms()), help="arms of configs/ablations.py")
  p.add_argument("--seeds", default=",".join(map(str, study.SEEDS)), help="pre-training seeds")
  p.add_argument("--tasks", default=",".join(study.TASKS), help="tasks of configs/ablations.py")
  p.add_argument(
      "--synthetic", default=f"{study.SYNTHETIC['num_train']},{study.SYNTHETIC['num_eval']}",
      help="images of each generated downstream set: train, and each of validation and test")
  p.add_argument("--data_dir", default="", help="datasets (default: WORKDIR/data)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="pre-training override for every run, e.g. --set train.batch_size=16")
  p.add_argument("--finetune_set", action="append", default=[], metavar="FIELD=VALUE",
                 help="fine-tuning override for every task, e.g. --finetune_set train.batch_size=8")
  p.add_argument("--out", default=DEFAULT_OUT, help="Markdown file whose results section is "
                 "written ('' = none)")
  args = p.parse_args(argv)
  try:
    args.seeds = [int(s) for s in _names(args.seeds)]
    train_images, eval_images = (int(n) for n in _names(args.synthetic))
  except ValueError:
    p.error(f"--seeds {args.seeds!r} / --synthetic {args.synthetic!r}: expected integers, "
            "e.g. --seeds 0,1 --synthetic 500,200")
  args.synthetic = {"num_train": train_images, "num_eval": eval_images}
  if args.steps < 0 or args.epochs < 0 or not args.seeds:
    p.error("need --steps >= 0, --epochs >= 0 and at least one seed")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  fixed = dict(overrides.parse(o) for o in args.set)
  if args.steps:
    fixed["train.steps"] = args.steps
  finetune = dict(overrides.parse(o) for o in args.finetune_set)
  if args.epochs:
    finetune["train.epochs"] = args.epochs
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "xla_cache"))
  return ablation.run(args.workdir, args.variant, args.data_dir, _names(args.arms), args.seeds,
                      _names(args.tasks), fixed, finetune, args.synthetic, args.out or None,
                      command=" ".join(["python benchmarks/ablations.py", *(argv or sys.argv[1:])]))


if __name__ == "__main__":
  try:
    failed = cli.one_line_errors("benchmarks/ablations.py", main) == 2  # an error in the input
  except ablation.Preempted as e:
    print(f"benchmarks/ablations.py: {e}", file=sys.stderr)
    sys.exit(128 + signal.SIGTERM)
  sys.exit(2 if failed else 0)
