"""RSNA Pneumonia Detection Challenge (stage 2): chest radiographs (DICOM) labelled normal or
pneumonia. Only the challenge's train images have labels, so train / validation / test are drawn
from them by patient with a fixed seed."""
import collections
import csv
import os

import numpy as np

from mpma_jax.data.builders import base


class RsnaPneumonia(base.Builder):
  """RSNA Pneumonia radiographs, normal vs pneumonia (seeded train / validation / test)."""
  TASK = "classification"
  CLASS_NAMES = ("normal", "pneumonia")
  LAYOUT = """\
  stage_2_train_labels.csv   patientId,x,y,width,height,Target (one row per box; Target 0 or 1)
  stage_2_train_images/      {patientId}.dcm"""
  SEED = 42
  VAL_FRACTION = 0.1
  TEST_FRACTION = 0.1

  def _split_paths(self, manual_dir):
    labels_csv, image_dir = self.require(manual_dir, "stage_2_train_labels.csv",
                                         "stage_2_train_images")
    targets = collections.defaultdict(list)  # patientId -> the Target of each of its rows
    with open(labels_csv, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      missing = [c for c in ("patientId", "Target") if c not in (reader.fieldnames or ())]
      if missing:
        raise ValueError(f"{labels_csv}: no column(s) {missing}")
      for r in reader:
        targets[(r["patientId"] or "").strip()].append((r["Target"] or "").strip())
    ids = sorted(targets)
    order = [ids[i] for i in np.random.default_rng(self.SEED).permutation(len(ids))]
    n = len(ids)
    n_val, n_test = round(n * self.VAL_FRACTION), round(n * self.TEST_FRACTION)
    if n >= 3:  # small copies (tests, subsets) still get every split
      n_val, n_test = max(1, n_val), max(1, n_test)
    parts = {
        "validation": order[:n_val], "test": order[n_val:n_val + n_test],
        "train": order[n_val + n_test:]
    }
    return {
        split: {"patients": {p: targets[p] for p in sorted(part)}, "image_dir": image_dir}
        for split, part in parts.items()
    }

  def _examples(self, split, patients, image_dir):
    for patient, values in patients.items():
      if not patient:
        self.skip(split, "empty patient id")
        continue
      if any(v not in ("0", "1", "0.0", "1.0") for v in values):
        self.skip(split, "bad label value")
        continue
      label = max(int(float(v)) for v in values)  # pneumonia if any row has a box
      image = self.read_image(split, os.path.join(image_dir, f"{patient}.dcm"))
      if image is None:
        continue
      yield patient, {
          "id": patient, "image": image, "text": "", "label": label,
          "labels": np.eye(2, dtype=np.float32)[label]
      }
