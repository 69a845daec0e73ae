"""MIMIC-CXR-JPG (Johnson et al. 2019): frontal (PA/AP) chest radiographs with the findings and
impression of their study's report and the study's CheXpert labels; the official split."""
import csv
import gzip
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from mpma_jax.data import text as texts
from mpma_jax.data.builders import base

# The 14 label columns of mimic-cxr-2.0.0-chexpert.csv, in file order.
CHEXPERT_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                   "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
                   "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
                   "Support Devices")
SPLITS = {"train": "train", "validate": "validation", "test": "test"}  # file value -> TFDS split
VIEWS = ("PA", "AP")
# A header at the start of a line: 'FINDINGS:', 'Impression :', 'RECOMMENDATION(S):', ...
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z ()/&-]*?)[ \t]*:", re.M)


def _csv_rows(path, columns):
  """The rows of a .csv or .csv.gz file as dicts (ValueError naming the file if a column is not
  in its header)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: no column(s) {missing}")
    yield from reader


def sections(report: str) -> dict[str, str]:
  """{'findings': ..., 'impression': ...} for the sections the report has (first occurrence; the
  text after the header up to the next ALL-CAPS header or the end)."""
  headers = []
  for m in _HEADER.finditer(report):
    name = m.group(1).strip()
    if name.upper() in ("FINDINGS", "IMPRESSION"):
      headers.append((name.lower(), m))
    elif name.isupper():  # mixed-case 'Note:' is prose, not a header
      headers.append((None, m))
  out = {}
  for i, (name, m) in enumerate(headers):
    if name and name not in out:
      end = headers[i + 1][1].start() if i + 1 < len(headers) else len(report)
      out[name] = report[m.end():end]
  return out


class MimicCxr(base.Builder):
  """MIMIC-CXR frontal radiographs with findings and impression (train / validation / test)."""
  TASK = "pretrain"
  CLASS_NAMES = CHEXPERT_LABELS
  LAYOUT = """\
  mimic-cxr-2.0.0-split.csv(.gz)      dicom_id,study_id,subject_id,split (train|validate|test)
  mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id,subject_id,study_id,...,ViewPosition,...
  mimic-cxr-2.0.0-chexpert.csv(.gz)   subject_id,study_id,<14 labels: 1.0, 0.0, -1.0 or empty>
  files/p10/p10000032/s50414267/<dicom_id>.jpg   (or .png converted by the user)
  files/p10/p10000032/s50414267.txt              the study's report (FINDINGS:, IMPRESSION:)"""

  def _info(self):
    # The pretrain schema plus what only MIMIC-CXR has: labels [14] (1, 0, -1, NaN = not
    # mentioned), the study and subject, and the view.
    features = tfds.features.FeaturesDict({
        **base.features_for("pretrain"), "labels": tfds.features.Tensor(
            shape=(len(CHEXPERT_LABELS),), dtype=np.float32), "study_id": tfds.features.Text(),
        "subject_id": tfds.features.Text(), "view": tfds.features.Text()
    })
    return tfds.core.DatasetInfo(
        builder=self, description=(self.__doc__ or "").strip(), features=features,
        metadata=tfds.core.MetadataDict(task=self.TASK, class_names=list(CHEXPERT_LABELS)))

  def _split_paths(self, manual_dir):
    split_csv, metadata_csv, chexpert_csv, files = self.require(
        manual_dir,
        *(f"mimic-cxr-2.0.0-{n}.csv|mimic-cxr-2.0.0-{n}.csv.gz"
          for n in ("split", "metadata", "chexpert")), "files")
    rows = list(_csv_rows(split_csv, ("dicom_id", "study_id", "subject_id", "split")))
    views = {
        r["dicom_id"]: r["ViewPosition"].strip()
        for r in _csv_rows(metadata_csv, ("dicom_id", "ViewPosition"))
    }
    labels = {
        (r["subject_id"], r["study_id"]):
            np.array([float(r[n]) if r[n].strip() else np.nan for n in CHEXPERT_LABELS], np.float32)
        for r in _csv_rows(chexpert_csv, ("subject_id", "study_id", *CHEXPERT_LABELS))
    }
    return {
        split: {
            "rows": [r for r in rows if SPLITS.get(r["split"]) == split], "views": views,
            "labels": labels, "files": files
        } for split in SPLITS.values()
    }

  def _report_texts(self, split, path):
    """The raw [findings, impression] sections of a report, or None (counted)."""
    if not os.path.exists(path):
      self.skip(split, "missing report")
      return None
    with open(path, "rb") as f:
      try:
        report = texts.to_str(f.read())
      except texts.TextError as e:
        self.skip(split, e.reason)
        return None
    found = sections(report)
    if not found:
      self.skip(split, "no findings or impression")
      return None
    return [found[n] for n in ("findings", "impression") if n in found]

  def _examples(self, split, rows, views, labels, files):
    no_labels = np.full(len(CHEXPERT_LABELS), np.nan, np.float32)
    for r in rows:
      dicom, study, subject = r["dicom_id"], r["study_id"], r["subject_id"]
      if dicom not in views:
        self.skip(split, "no metadata row")
        continue
      if views[dicom] not in VIEWS:
        self.skip(split, "view not PA/AP")
        continue
      study_dir = os.path.join(files, f"p{subject[:2]}", f"p{subject}", f"s{study}")
      raw = self._report_texts(split, study_dir + ".txt")
      if raw is None:
        continue
      found = self.clean_texts(split, raw)
      if not found:
        self.skip(split, "no usable text")
        continue
      path = os.path.join(study_dir, f"{dicom}.jpg")
      if not os.path.exists(path) and os.path.exists(path[:-4] + ".png"):
        path = path[:-4] + ".png"
      image = self.read_image(split, path)
      if image is None:
        continue
      yield dicom, {
          "id": dicom, "image": image, "texts": found, "labels": labels.get(
              (subject, study), no_labels), "study_id": study, "subject_id": subject,
          "view": views[dicom]
      }
