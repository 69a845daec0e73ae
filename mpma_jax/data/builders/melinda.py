"""MELINDA (Wu et al. 2021): biomedical figures with captions, classified by experiment method
(task: p_meth_label, 7 classes, accuracy)."""
import csv
import os

import numpy as np

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
    names = sorted({row["p_meth_label"].strip() for row in self._rows(paths["train"])} - {""})
    if len(names) != NUM_CLASSES:
      raise ValueError(f"{paths['train']}: expected {NUM_CLASSES} p_meth_label classes, found "
                       f"{len(names)}: {names}")
    self.class_names = names
    self.info.metadata["class_names"] = names
    return {split: {"path": path, "image_dir": image_dir} for split, path in paths.items()}

  @staticmethod
  def _rows(path):
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
      if missing:
        raise ValueError(f"{path}: no column(s) {missing}; found {reader.fieldnames}")
      return list(reader)

  def _examples(self, split, path, image_dir):
    index = {name: i for i, name in enumerate(self.class_names)}
    for row in self._rows(path):
      label = row["p_meth_label"].strip()
      if label not in index:
        self.skip(split, "unknown label")
        continue
      caption = " ".join((row.get("caption") or "").split())  # may be empty: image-only use
      image = self.read_image(split, os.path.join(image_dir, row["figure_file"]))
      if image is None:
        continue
      onehot = np.zeros(NUM_CLASSES, np.float32)
      onehot[index[label]] = 1.0
      yield row["figure_file"], {
          "id": row["figure_file"], "image": image, "text": caption, "label": index[label],
          "labels": onehot
      }
