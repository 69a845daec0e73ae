"""mpma-data: build a dataset from the files as distributed, and look at what was built.

  mpma-data build NAME --manual_dir DIR --data_dir DIR [--overwrite]
      prints one JSON line: "built" or "reused" (the same files as the build in data_dir), per
      split the examples written and skipped by reason; refuses (exit 2) when data_dir holds a
      build from other files, naming what changed, unless --overwrite
  mpma-data show NAME --data_dir DIR [--split S] [--num N]
  mpma-data list                                         # the dataset names and their tasks
"""
import argparse
import json
import sys

from mpma_jax import cli
from mpma_jax.data import builders, catalog


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="mpma-data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("build", help="build a dataset as ArrayRecord")
  p.add_argument("name", help=f"one of: {', '.join(sorted(builders.BUILDERS))}")
  p.add_argument("--manual_dir", default="", help="the dataset's files as distributed")
  p.add_argument("--data_dir", required=True, help="where the built dataset goes")
  p.add_argument("--overwrite", action="store_true",
                 help="build again when data_dir holds a build of this dataset from other files")
  p = sub.add_parser("show", help="print a few decoded examples of a built dataset")
  p.add_argument("name")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--split", default="train")
  p.add_argument("--num", type=int, default=3)
  p.add_argument("--size", type=int, default=0, help="also resize + crop images to this size")
  sub.add_parser("list", help="dataset names and tasks")
  args = parser.parse_args(argv)
  catalog.quiet()
  return cli.one_line_errors(f"mpma-data {args.command}", _run, args)


def _run(args) -> int:
  if args.command == "build":
    print(json.dumps(catalog.build(args.name, args.manual_dir, args.data_dir, args.overwrite)),
          flush=True)
  elif args.command == "show":
    print("\n".join(catalog.show(args.name, args.data_dir, args.split, args.num, args.size)),
          flush=True)
  else:
    print("\n".join(catalog.catalog()))
  return 0


def run():
  sys.exit(main())


if __name__ == "__main__":
  run()
