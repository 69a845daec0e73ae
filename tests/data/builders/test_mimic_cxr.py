"""MIMIC-CXR: a tiny copy in the distributed layout (plain and gzipped CSVs, JPG and PNG images)
keeps frontal views with their report sections and CheXpert labels, and counts everything else."""
import csv
import gzip
import io
import math
import re
import shutil

import numpy as np
import pytest

from mpma_jax.data import builders, images
from mpma_jax.data.builders import mimic_cxr

FULL = """\
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Heart size
 is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
LOWER = """\
 Findings: Small left pleural effusion is unchanged.
 Note: the patient was rotated.
 Impression: Stable small left effusion.
 RECOMMENDATION(S): Follow-up radiograph in two weeks.
"""
NO_SECTIONS = " WET READ: ___ ___ 10:00 AM\n  No pneumothorax seen on this film.\n"
SHORT = " Findings: none.\n\n IMPRESSION: Normal.\n"
IMPRESSION_ONLY = " INDICATION: Line placement.\n IMPRESSION: Right PICC tip in the SVC.\n"

# dicom_id, study_id, subject_id, split, ViewPosition (None: no metadata row), report (None: no
# file), image ('jpg' | 'png' | 'corrupt' | None: missing)
ROWS = [
    ("d1", "50000001", "10000032", "train", "PA", FULL, "jpg"),
    ("d2", "50000001", "10000032", "train", "LATERAL", FULL, "jpg"),
    ("d3", "50000002", "10000032", "train", "AP", FULL, "png"),
    ("d4", "50000003", "10000032", "train", "PA", NO_SECTIONS, "jpg"),
    ("d5", "50000004", "10000032", "train", "PA", None, "jpg"),
    ("d6", "50000005", "10000032", "train", "PA", FULL, None),
    ("d7", "50000006", "10000032", "train", "PA", FULL, "corrupt"),
    ("d8", "50000007", "10000032", "train", "PA", SHORT, "jpg"),
    ("d9", "50000008", "10000032", "train", None, FULL, "jpg"),
    ("v1", "51000001", "11000011", "validate", "AP", LOWER, "jpg"),
    ("v2", "51000001", "11000011", "validate", "", LOWER, "jpg"),
    ("t1", "52000001", "12000012", "test", "PA", IMPRESSION_ONLY, "png"),
]
# (subject_id, study_id) -> label values as written; 50000002 has no row (all NaN).
CHEXPERT = {
    ("10000032", "50000001"): {"Cardiomegaly": "1.0", "Consolidation": "-1.0", "Edema": "0.0"},
    ("11000011", "51000001"): {"Pleural Effusion": "1.0", "No Finding": "0.0"},
    ("12000012", "52000001"): {"Support Devices": "1.0"},
}
META = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"
]


def _csv(manual, name, header, rows, gz):
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  if gz:
    (manual / (name + ".gz")).write_bytes(gzip.compress(buf.getvalue().encode()))
  else:
    (manual / name).write_text(buf.getvalue())


def _write(manual, gz=False):
  manual.mkdir(parents=True)
  _csv(manual, "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
       [r[:4] for r in ROWS], gz)
  _csv(manual, "mimic-cxr-2.0.0-metadata.csv", META,
       [(d, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, 21800506, 213014.531,
         "CHEST (PA AND LAT)", "postero-anterior", "Erect")
        for d, study, subject, _, view, _, _ in ROWS if view is not None], gz)
  # Label columns are read by name: the gzipped copy lists them in reverse order.
  labels = list(mimic_cxr.CHEXPERT_LABELS)[::-1 if gz else 1]
  _csv(manual, "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *labels],
       [(subject, study, *(values.get(n, "") for n in labels))
        for (subject, study), values in CHEXPERT.items()], gz)
  rng = np.random.default_rng(0)
  for d, study, subject, _, _, report, image in ROWS:
    study_dir = manual / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
    study_dir.mkdir(parents=True, exist_ok=True)
    if report is not None:
      (study_dir.parent / f"s{study}.txt").write_text(report)
    pixels = rng.integers(0, 256, (16, 12), dtype=np.uint8)
    if image == "png":
      (study_dir / f"{d}.png").write_bytes(images.encode_png(pixels))
    elif image in ("jpg", "corrupt"):
      data = images.encode_jpeg(pixels)
      (study_dir / f"{d}.jpg").write_bytes(data if image == "jpg" else data[:len(data) // 3])


def _ids(b, split):
  source = b.as_data_source(split)
  return {source[i]["id"].decode(): source[i] for i in range(len(source))}


def _labels(**values):
  out = [math.nan] * len(mimic_cxr.CHEXPERT_LABELS)
  for name, value in values.items():
    out[mimic_cxr.CHEXPERT_LABELS.index(name.replace("_", " "))] = value
  return out


def _same(a, b):
  return np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), equal_nan=True)


@pytest.mark.parametrize("gz", [False, True])
def test_build_report_and_fields(tmp_path, gz):
  _write(tmp_path / "manual", gz)
  b, report = builders.build("mimic_cxr", str(tmp_path / "manual"), str(tmp_path / "out"))
  assert report == {
      "train": {
          "written": 2, "skipped": {
              "missing image": 1, "missing report": 1, "no findings or impression": 1,
              "no metadata row": 1, "no usable text": 1, "text too short (one of several texts)": 2,
              "unreadable image": 1, "view not PA/AP": 1
          }
      }, "validation": {"written": 1, "skipped": {"view not PA/AP": 1}},
      "test": {"written": 1, "skipped": {}}
  }
  assert b.info.metadata["class_names"] == list(mimic_cxr.CHEXPERT_LABELS)
  train, validation, test = (_ids(b, s) for s in ("train", "validation", "test"))
  assert set(train) == {"d1", "d3"} and set(validation) == {"v1"} and set(test) == {"t1"}
  d1 = train["d1"]
  assert d1["texts"] == [
      b"There is no focal consolidation, pleural effusion or pneumothorax. Heart size is normal.",
      b"No acute cardiopulmonary process."
  ]
  assert (d1["study_id"], d1["subject_id"], d1["view"]) == (b"50000001", b"10000032", b"PA")
  assert d1["labels"].dtype == np.float32
  assert _same(d1["labels"], _labels(Cardiomegaly=1.0, Consolidation=-1.0, Edema=0.0))
  assert _same(train["d3"]["labels"], _labels())  # the study has no CheXpert row
  assert train["d3"]["view"] == b"AP"
  assert images.decode(train["d3"]["image"]).shape == (16, 12, 3)  # the PNG fallback
  # Case-insensitive headers; 'Note:' is prose; an ALL-CAPS header ends the impression.
  assert validation["v1"]["texts"] == [
      b"Small left pleural effusion is unchanged. Note: the patient was rotated.",
      b"Stable small left effusion."
  ]
  assert _same(validation["v1"]["labels"], _labels(Pleural_Effusion=1.0, No_Finding=0.0))
  assert test["t1"]["texts"] == [b"Right PICC tip in the SVC."]
  assert _same(test["t1"]["labels"], _labels(Support_Devices=1.0))


def test_jpg_is_preferred_over_png(tmp_path):
  _write(tmp_path / "manual")
  study_dir = tmp_path / "manual" / "files" / "p10" / "p10000032" / "s50000001"
  (study_dir / "d1.png").write_bytes(images.encode_png(np.zeros((4, 4), np.uint8)))
  b, _ = builders.build("mimic_cxr", str(tmp_path / "manual"), str(tmp_path / "out"))
  assert _ids(b, "train")["d1"]["image"] == (study_dir / "d1.jpg").read_bytes()


def test_sections():
  assert mimic_cxr.sections(FULL) == {
      "findings": "\n\n There is no focal consolidation, pleural effusion or pneumothorax.  "
                  "Heart size\n is normal.\n\n",
      "impression": "\n\n No acute cardiopulmonary process.\n"
  }
  assert mimic_cxr.sections(NO_SECTIONS) == {}
  assert mimic_cxr.sections("IMPRESSION: One.\nIMPRESSION: Two.\n") == {"impression": " One.\n"}


@pytest.mark.parametrize(
    "missing",
    ["mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-chexpert.csv"])
def test_missing_file_is_named(tmp_path, missing):
  _write(tmp_path / "manual")
  (tmp_path / "manual" / missing).unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(f"expected '{missing}' or '{missing}.gz'")):
    builders.build("mimic_cxr", str(tmp_path / "manual"), str(tmp_path / "out"))


def test_missing_files_dir_is_named(tmp_path):
  _write(tmp_path / "manual")
  shutil.rmtree(tmp_path / "manual" / "files")
  with pytest.raises(FileNotFoundError, match=re.escape("expected 'files' in manual_dir")):
    builders.build("mimic_cxr", str(tmp_path / "manual"), str(tmp_path / "out"))


def test_missing_label_column_is_named(tmp_path):
  _write(tmp_path / "manual")
  path = tmp_path / "manual" / "mimic-cxr-2.0.0-chexpert.csv"
  path.write_text(path.read_text().replace("Pleural Other", "Pleural_Other"))
  with pytest.raises(ValueError, match=r"chexpert\.csv: no column\(s\) \['Pleural Other'\]"):
    builders.build("mimic_cxr", str(tmp_path / "manual"), str(tmp_path / "out"))
