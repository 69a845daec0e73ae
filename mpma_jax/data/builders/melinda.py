"""MELINDA (Wu et al. 2021): biomedical figures with captions, classified by experiment method
(task: p_meth_label, 7 classes, accuracy)."""
import os

import numpy as np

from mpma_jax.data import text as texts
from mpma_jax.data.builders import base

SPLITS = {"train": "train", "dev": "validation", "test": "test"}  # file -> TFDS split
NUM_CLASSES = 7
COLUMNS = ("figure_file", "caption", "p_meth_label")


class Melinda(base.Builder):
  """MELINDA experiment-method classification (p_meth_label; train / validation / test)."""
  TASK = "classification"
  CLASS_NAMES = tuple(f"class_{i}" for i in range(NUM_CLASSES))  # replaced by the data's labels
  LAYOUT = """\
  train.csv, dev.csv, test.csv   figure_file,caption,i_meth,p_meth,i_meth_label,p_meth_label
  melinda_images/{figure_file}"""

  def _split_paths(self, manual_dir):
    (image_dir,) = self.require(manual_dir, "melinda_images")
    paths = {split: self.require(manual_dir, f"{name}.csv")[0] for name, split in SPLITS.items()}
    # The class list is the sorted p_meth_label values of train.csv (recorded in the dataset's
    # metadata); a test or dev label outside it is skipped and counted.
    fields = [self._fields(row) for row in self._rows(paths["train"])]
    names = sorted({f[2] for f in fields if isinstance(f, tuple)} - {""})
    if len(names) != NUM_CLASSES:
      raise ValueError(f"{paths['train']}: expected {NUM_CLASSES} p_meth_label classes, found "
                       f"{len(names)}: {names}")
    self.class_names = names
    self.info.metadata["class_names"] = names
    return {split: {"path": path, "image_dir": image_dir} for split, path in paths.items()}

  @staticmethod
  def _rows(path):
    """The rows of a MELINDA CSV as dicts; bytes that are not UTF-8 stay escaped (see _fields)."""
    columns, rows = base.csv_rows(path)
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
      raise ValueError(f"{path}: no column(s) {missing}; found {list(columns)}")
    return rows

  @staticmethod
  def _fields(row):
    """(figure_file, caption, label) of a row, stripped, or the reason it is unusable (a str)."""
    if None in row or None in row.values():  # more or fewer fields than the header
      return "malformed line"
    try:
      return tuple(texts.utf8(row[c]).strip() for c in COLUMNS)
    except texts.TextError as e:
      return e.reason

  def _examples(self, split, path, image_dir):
    index = {name: i for i, name in enumerate(self.class_names)}
    for row in self._rows(path):
      fields = self._fields(row)
      if isinstance(fields, str):
        self.skip(split, fields)
        continue
      name, caption, label = fields
      if label not in index:
        self.skip(split, "unknown label")
        continue
      if not name:
        self.skip(split, "no image name")
        continue
      image_path = os.path.join(image_dir, name)
      if os.path.isdir(image_path):  # a folder, not an image file
        self.skip(split, "missing image")
        continue
      image = self.read_image(split, image_path)
      if image is None:
        continue
      onehot = np.zeros(NUM_CLASSES, np.float32)
      onehot[index[label]] = 1.0
      caption = " ".join(caption.split())  # may be empty: image-only use
      yield name, {
          "id": name, "image": image, "text": caption, "label": index[label], "labels": onehot
      }
