"""RSNA Pneumonia Detection Challenge (stage 2): chest radiographs (DICOM) labelled normal or
pneumonia. Only the challenge's train images have labels, so train / validation / test are drawn
from them by patient, each patient's split decided by a hash of its id alone."""
import collections
import hashlib
import os

import numpy as np

from mpma_jax.data import text as texts
from mpma_jax.data.builders import base


class RsnaPneumonia(base.Builder):
  """RSNA Pneumonia radiographs, normal vs pneumonia (train / validation / test by patient-id
  hash)."""
  TASK = "classification"
  CLASS_NAMES = ("normal", "pneumonia")
  LAYOUT = """\
  stage_2_train_labels.csv   patientId,x,y,width,height,Target (one row per box; Target 0 or 1)
  stage_2_train_images/      {patientId}.dcm"""
  VAL_FRACTION = 0.1
  TEST_FRACTION = 0.1

  @classmethod
  def split_of(cls, patient_id: str) -> str:
    """'validation', 'test' or 'train' for a patient, from its id alone: the first 8 bytes of the
    id's SHA-256 as a fraction in [0, 1), compared with the held-out fractions. A copy that lacks
    some patients therefore leaves every other patient in its split. (An id with bytes that are
    not UTF-8, read escaped, gets a split too, where it is counted.)"""
    digest = hashlib.sha256(patient_id.encode("utf-8", "surrogateescape")).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    if fraction < cls.VAL_FRACTION:
      return "validation"
    return "test" if fraction < cls.VAL_FRACTION + cls.TEST_FRACTION else "train"

  def _split_paths(self, manual_dir):
    labels_csv, image_dir = self.require(manual_dir, "stage_2_train_labels.csv",
                                         "stage_2_train_images")
    # Bytes that are not UTF-8 stay escaped and are counted per patient.
    columns, rows = base.csv_rows(labels_csv)
    missing = [c for c in ("patientId", "Target") if c not in columns]
    if missing:
      raise ValueError(f"{labels_csv}: no column(s) {missing}")
    targets = collections.defaultdict(list)  # patientId -> the Target of each of its rows
    for r in rows:
      targets[(r["patientId"] or "").strip()].append((r["Target"] or "").strip())
    parts = {"validation": {}, "test": {}, "train": {}}
    for patient in sorted(targets):
      parts[self.split_of(patient)][patient] = targets[patient]
    return {split: {"patients": part, "image_dir": image_dir} for split, part in parts.items()}

  def _examples(self, split, patients, image_dir):
    for patient, values in patients.items():
      if not patient:
        self.skip(split, "empty patient id")
        continue
      try:
        texts.utf8(patient)
      except texts.TextError as e:
        self.skip(split, e.reason)
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
