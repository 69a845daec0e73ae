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
# Section headers of MIMIC-CXR reports (upper case, spaces collapsed) -> the text they hold:
# 'findings', 'impression' (FINDINGS AND IMPRESSION and CONCLUSION included), or None for a
# section that is not used but ends the one before it; common misspellings are listed too. Any
# other 'WORDS:' at the start of a line ('NG TUBE:', 'PA AND LATERAL VIEWS OF THE CHEST:', 'Note:')
# is text of the section it is in.
_FINDINGS = ("FINDINGS", "FINDING", "FINDINS", "FINDNGS", "FINIDNGS")
_IMPRESSION = ("IMPRESSION", "IMPRESSIONS", "IMPRESSON", "IMPRESION", "IMPESSION", "CONCLUSION",
               "CONCLUSIONS", "FINDINGS AND IMPRESSION", "FINDINGS AND IMPRESSIONS",
               "FINDINGS/IMPRESSION", "FINDINGS/IMPRESSIONS", "IMPRESSION/FINDINGS",
               "FINDINGS & IMPRESSION")
_OTHER = ("INDICATION", "INDICATIONS", "CLINICAL INDICATION", "HISTORY", "CLINICAL HISTORY",
          "PATIENT HISTORY", "CLINICAL INFORMATION", "REASON FOR EXAMINATION", "REASON FOR EXAM",
          "EXAMINATION", "EXAM", "TYPE OF EXAMINATION", "PROCEDURE", "TECHNIQUE", "COMPARISON",
          "COMPARISONS", "COMPARISON EXAM", "COMPARISON FILM", "REFERENCE EXAM", "WET READ",
          "WETREAD", "PROVISIONAL FINDINGS IMPRESSION (PFI)", "PFI", "NOTIFICATION",
          "RECOMMENDATION", "RECOMMENDATIONS", "RECOMMENDATION(S)", "ADDENDUM", "COMMENT",
          "COMMENTS", "DATE")
HEADERS = {
    **dict.fromkeys(_FINDINGS, "findings"), **dict.fromkeys(_IMPRESSION, "impression"),
    **dict.fromkeys(_OTHER, None)
}
# Words and a colon at the start of a line: 'FINDINGS:', 'Impression :', 'RECOMMENDATION(S):', ...
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z ,()/&-]*?)[ \t]*:", re.M)


def _header_name(words: str) -> str:
  """'Findings / impression ' -> 'FINDINGS/IMPRESSION' (the form of the HEADERS keys)."""
  return re.sub(r" ?/ ?", "/", " ".join(words.upper().split()))


def _csv_rows(path, columns):
  """(line number, row as a dict) of a .csv or .csv.gz file. ValueError naming the file (and the
  line) if a column is not in its header, a row has more or fewer fields or is not UTF-8, or the
  file cannot be read as CSV."""
  opener = gzip.open if path.endswith(".gz") else open
  line = 0
  try:
    with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
      reader = csv.DictReader(f)
      missing = [c for c in columns if c not in (reader.fieldnames or ())]
      if missing:
        raise ValueError(f"{path}: no column(s) {missing}")
      for row in reader:
        line = reader.line_num
        if None in row or None in row.values():
          raise ValueError(f"{path}: line {line}: {'more' if None in row else 'fewer'} fields "
                           f"than the {len(reader.fieldnames)} columns of the header")
        try:
          texts.utf8("".join(row.values()))
        except texts.TextError:
          raise ValueError(f"{path}: line {line}: not UTF-8") from None
        yield line, row
  except (OSError, EOFError, csv.Error) as e:
    raise ValueError(f"{path}: not readable as CSV after line {line} ({e})") from None


def _labels(path, line, row) -> np.ndarray:
  """The 14 CheXpert values of a label-file row (NaN for empty); ValueError naming the file and
  line for a value other than 1, 0, -1 or empty."""
  out = np.full(len(CHEXPERT_LABELS), np.nan, np.float32)
  for i, name in enumerate(CHEXPERT_LABELS):
    value = row[name].strip()
    if not value:
      continue
    try:
      number = float(value)
    except ValueError:
      number = None
    if number not in (1.0, 0.0, -1.0):
      raise ValueError(f"{path}: line {line}: {name} is {value!r}; expected 1.0, 0.0, -1.0 or "
                       "empty")
    out[i] = number
  return out


def sections(report: str) -> dict[str, str]:
  """{'findings': ..., 'impression': ...} for the sections the report has: the text after the
  section's header (HEADERS) up to the next known header or the end (first occurrence of each)."""
  headers = [(HEADERS[name], m) for m in _HEADER.finditer(report)
             if (name := _header_name(m.group(1))) in HEADERS]
  out = {}
  for i, (kind, m) in enumerate(headers):
    if kind and kind not in out:
      end = headers[i + 1][1].start() if i + 1 < len(headers) else len(report)
      out[kind] = report[m.end():end]
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
    rows = []
    for line, r in _csv_rows(split_csv, ("dicom_id", "study_id", "subject_id", "split")):
      if r["split"] not in SPLITS:
        raise ValueError(f"{split_csv}: line {line}: split is {r['split']!r}; expected one of "
                         f"{', '.join(SPLITS)}")
      rows.append(r)
    views = {
        r["dicom_id"]: r["ViewPosition"].strip()
        for _, r in _csv_rows(metadata_csv, ("dicom_id", "ViewPosition"))
    }
    labels = {(r["subject_id"], r["study_id"]): _labels(chexpert_csv, line, r)
              for line, r in _csv_rows(chexpert_csv, ("subject_id", "study_id", *CHEXPERT_LABELS))}
    return {
        split: {
            "rows": [r for r in rows if SPLITS[r["split"]] == split], "views": views,
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
