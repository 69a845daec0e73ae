"""`mpma-data`: build a dataset from the files as distributed, and look at what was built.

  mpma-data build NAME --manual_dir DIR --data_dir DIR   # prints one JSON line: per split, examples
                                                         # written and skipped by reason
  mpma-data show NAME --data_dir DIR [--split S] [--num N]
  mpma-data list                                         # the dataset names and their tasks
"""
import argparse
import contextlib
import json
import logging
import os
import sys

import numpy as np

from mpma_jax.data import builders, images
from mpma_jax.data.builders import base


def _quiet() -> None:
  """TFDS prints progress bars and INFO lines; the command's output is the JSON line."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger("absl").setLevel(logging.ERROR)


def build(name: str, manual_dir: str, data_dir: str) -> dict:
  """Builds NAME; returns {"dataset", "data_dir", "splits": {split: {"written", "skipped"}}}."""
  cls = builders.get(name)
  if not cls.GENERATED and not os.path.isdir(manual_dir):
    raise base.ManualDirError(
        f"{name}: --manual_dir {manual_dir!r} is not a directory. Expected layout:\n{cls.LAYOUT}")
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress lines on stdout
    b, report = builders.build(name, manual_dir, data_dir)
  return {"dataset": name, "data_dir": os.fspath(b.data_dir), "splits": report}


def _describe(value) -> str:
  if isinstance(value, bytes):
    return repr(value.decode("utf-8", "replace")[:200])
  if isinstance(value, (list, tuple)):
    return "[" + ", ".join(_describe(v) for v in value) + "]"
  if isinstance(value, np.ndarray) and value.dtype == object:
    return _describe(list(value))
  return repr(value.tolist() if isinstance(value, np.ndarray) else value)


def show(name: str, data_dir: str, split: str, num: int, size: int = 0) -> list[str]:
  """Text lines describing the first `num` examples of a built split (images decoded)."""
  b = builders.builder(name, data_dir)
  if not b.is_prepared():
    raise FileNotFoundError(f"{name} is not built under --data_dir {data_dir!r}; run `mpma-data "
                            f"build {name} --manual_dir DIR --data_dir {data_dir}` first")
  if split not in b.info.splits:
    raise ValueError(f"{name} has no split {split!r}; it has {sorted(b.info.splits)}")
  source = b.as_data_source(split)
  lines = [f"{name} [{b.info.metadata.get('task')}] {split}: {len(source)} examples "
           f"({os.fspath(b.data_dir)})"]
  report = base.read_report(b)
  if report and report.get(split, {}).get("skipped"):
    lines.append(f"  skipped when built: {report[split]['skipped']}")
  for i in range(min(num, len(source))):
    ex = source[i]
    parts = []
    for key in sorted(ex):
      if key == "image":
        try:
          img = images.decode(ex["image"])
          if size:
            img = images.resize_crop(img, size)
          parts.append(f"image=uint8{list(img.shape)} range [{img.min()}, {img.max()}] "
                       f"({len(ex['image'])} bytes)")
        except images.ImageError as e:
          parts.append(f"image=UNREADABLE ({e})")
      else:
        parts.append(f"{key}={_describe(ex[key])}")
    lines.append(f"  [{i}] " + "  ".join(parts))
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="mpma-data", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("build", help="build a dataset as ArrayRecord")
  p.add_argument("name", help=f"one of: {', '.join(sorted(builders.BUILDERS))}")
  p.add_argument("--manual_dir", default="", help="the dataset's files as distributed")
  p.add_argument("--data_dir", required=True, help="where the built dataset goes")
  p = sub.add_parser("show", help="print a few decoded examples of a built dataset")
  p.add_argument("name")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--split", default="train")
  p.add_argument("--num", type=int, default=3)
  p.add_argument("--size", type=int, default=0, help="also resize + crop images to this size")
  sub.add_parser("list", help="dataset names and tasks")
  args = parser.parse_args(argv)
  _quiet()
  try:
    if args.command == "build":
      print(json.dumps(build(args.name, args.manual_dir, args.data_dir)), flush=True)
    elif args.command == "show":
      print("\n".join(show(args.name, args.data_dir, args.split, args.num, args.size)), flush=True)
    else:
      for name in sorted(builders.BUILDERS):
        cls = builders.get(name)
        print(f"{name:16s} {cls.TASK:15s} {(cls.__doc__ or '').strip().splitlines()[0]}")
  except (ValueError, FileNotFoundError) as e:
    print(f"mpma-data {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


def run():
  sys.exit(main())


if __name__ == "__main__":
  run()
