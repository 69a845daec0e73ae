"""CheXpert-v1.0-small (Irvin et al. 2019): chest radiographs with 14 labels extracted from their
reports (1 positive, 0 negative, -1 uncertain, empty = not mentioned); the official train / valid
split. Prior work reports the mean AUC over the 5 competition labels."""
import os

import numpy as np

from mpma_jax.data import text as texts
from mpma_jax.data.builders import base

DIR = "CheXpert-v1.0-small"
# The 14 label columns of train.csv / valid.csv, in file order (read by name).
LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
          "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
          "Pleural Other", "Fracture", "Support Devices")
COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
SPLITS = {"train": "train.csv", "validation": "valid.csv"}
_VALUES = (1.0, 0.0, -1.0)


class Chexpert(base.Builder):
  """CheXpert-v1.0-small multi-label chest radiographs, frontal and lateral (train / validation)."""
  TASK = "classification"
  CLASS_NAMES = LABELS
  LAYOUT = f"""\
  {DIR}/train.csv   Path,Sex,Age,Frontal/Lateral,AP/PA,<14 labels: 1.0, 0.0, -1.0 or empty>
  {DIR}/valid.csv   same columns
  {DIR}/train/patient00001/study1/view1_frontal.jpg   (Path, relative to manual_dir)
  {DIR}/valid/...
  (manual_dir may also be {DIR} itself)"""

  def _split_paths(self, manual_dir):
    train, = self.require(manual_dir, f"{DIR}/train.csv|train.csv")
    root = os.path.dirname(train)
    valid, = self.require(root, "valid.csv")
    return {"train": {"path": train, "root": root}, "validation": {"path": valid, "root": root}}

  def _examples(self, split, path, root):
    # Bytes that are not UTF-8 stay escaped and are counted per row.
    columns, rows = base.csv_rows(path)
    missing = [c for c in ("Path", *LABELS) if c not in columns]
    if missing:
      raise ValueError(f"{path}: no column(s) {missing}")
    seen = set()
    for r in rows:
      if None in r.values():  # fewer fields than the header: its last labels are unknown
        self.skip(split, "truncated row")
        continue
      if None in r:
        self.skip(split, "too many fields")
        continue
      try:
        name = texts.utf8(r["Path"])
      except texts.TextError as e:
        self.skip(split, e.reason)
        continue
      # Path starts with the distribution's directory name, which manual_dir may be or contain.
      name = name.strip().replace("\\", "/")
      parts = name.split("/")
      rel = "/".join(parts[1:] if len(parts) > 1 and parts[0] not in ("train", "valid") else parts)
      if not rel:
        self.skip(split, "empty path")
        continue
      if rel in seen:  # (checked here, before its image is read; counted as base.Builder does)
        self.skip(split, "duplicate")
        continue
      seen.add(rel)
      labels = self._labels(r)
      if labels is None:
        self.skip(split, "bad label value")
        continue
      image = self.read_image(split, os.path.join(root, *rel.split("/")))
      if image is None:
        continue
      yield rel, {"id": rel, "image": image, "text": "", "label": -1, "labels": labels}

  @staticmethod
  def _labels(row):
    """The 14 label values (NaN for empty) as float32, or None if one is not 1, 0, -1 or empty."""
    out = np.full(len(LABELS), np.nan, np.float32)
    for i, name in enumerate(LABELS):
      value = row[name].strip()
      if not value:
        continue
      try:
        out[i] = float(value)
      except ValueError:
        return None
      if out[i] not in _VALUES:
        return None
    return out
