"""Building a dataset from its files as distributed, and reading back what was built (mpma-data)."""
import contextlib
import logging
import os
import sys

from absl import logging as absl_logging
import numpy as np
import tensorflow_datasets as tfds

from mpma_jax.data import builders, images
from mpma_jax.data.builders import base


def quiet() -> None:
  """TFDS prints progress bars and INFO lines; the command's output is the JSON line."""
  tfds.disable_progress_bar()
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger("absl").setLevel(logging.ERROR)


def build(name: str, manual_dir: str, data_dir: str, overwrite: bool = False) -> dict:
  """Builds NAME; returns {"dataset", "status" ("built" | "reused"), "data_dir", "splits": {split:
  {"written", "skipped"}}} and, when some key is in several splits, "duplicates_across_splits"."""
  cls = builders.get(name)
  if not cls.GENERATED and not os.path.isdir(manual_dir):
    raise base.ManualDirError(
        f"{name}: --manual_dir {manual_dir!r} is not a directory. Expected layout:\n{cls.LAYOUT}")
  check_writable(data_dir)
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress lines on stdout
    b, report = builders.build(name, manual_dir, data_dir, overwrite=overwrite)
  out = {"dataset": name, "status": b.status, "data_dir": os.fspath(b.data_dir), "splits": report}
  if b.across_splits:
    out["duplicates_across_splits"] = dict(b.across_splits)
  return out


def check_writable(data_dir: str) -> None:
  """ValueError naming --data_dir when it is a file or cannot be created or written to."""
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ValueError(f"--data_dir {data_dir!r} is a file, not a directory")
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--data_dir {data_dir!r} cannot be created: {e.strerror}") from e
  if not os.access(data_dir, os.W_OK | os.X_OK):
    raise ValueError(f"--data_dir {data_dir!r} is not writable")


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
  lines = [
      f"{name} [{b.info.metadata.get('task')}] {split}: {len(source)} examples "
      f"({os.fspath(b.data_dir)})"
  ]
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


def catalog() -> list[str]:
  """One line per dataset: name, task, description."""
  lines = []
  for name in sorted(builders.BUILDERS):
    cls = builders.get(name)
    lines.append(f"{name:16s} {cls.TASK:15s} {(cls.__doc__ or '').strip().splitlines()[0]}")
  return lines
