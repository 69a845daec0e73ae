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


# Report shapes of MIMIC-CXR -> the findings / impression that `sections` finds (whitespace
# collapsed here); every section ends at the next known header, whatever other 'WORDS:' it holds.
SHAPES = {
    "headers on their own lines": (FULL, {
        "findings": "There is no focal consolidation, pleural effusion or pneumothorax. Heart "
                    "size is normal.", "impression": "No acute cardiopulmonary process."
    }),
    "text after the colon":
        (" INDICATION: Cough.\n FINDINGS: Lungs are clear. No effusion.\n IMPRESSION: Normal "
         "chest.\n", {"findings": "Lungs are clear. No effusion.", "impression": "Normal chest."}),
    "mixed and lower case": (" Findings: Mild cardiomegaly.\n impression:  Cardiomegaly.\n",
                             {"findings": "Mild cardiomegaly.", "impression": "Cardiomegaly."}),
    "sub-headers inside findings":
        (" FINDINGS:\n PA AND LATERAL VIEWS OF THE CHEST: The lungs are clear.\n NG TUBE: Tip in "
         "the stomach.\n Lines and tubes: Right IJ line ends in the SVC.\n\n IMPRESSION:\n Tubes "
         "in standard position.\n", {
             "findings": "PA AND LATERAL VIEWS OF THE CHEST: The lungs are clear. NG TUBE: Tip in "
                         "the stomach. Lines and tubes: Right IJ line ends in the SVC.",
             "impression": "Tubes in standard position."
         }),
    "findings and impression":
        (" EXAMINATION: CHEST (PORTABLE AP)\n\n FINDINGS AND IMPRESSION:\n Low lung volumes. No "
         "pneumothorax.\n", {"impression": "Low lung volumes. No pneumothorax."}),
    "findings/impression": (" FINDINGS / IMPRESSION: Stable right effusion.\n",
                            {"impression": "Stable right effusion."}),
    "conclusion only":
        (" HISTORY: Fever.\n TECHNIQUE: Single AP view.\n CONCLUSION: No pneumonia.\n",
         {"impression": "No pneumonia."}),
    "impression only": (IMPRESSION_ONLY, {"impression": "Right PICC tip in the SVC."}),
    "no headers": ("  The lungs are clear. There is no effusion.\n", {}),
    "unknown headers only": (" NG TUBE: In the stomach.\n LUNGS: Clear.\n", {}),
    "misspelled headers": (" FINDING: Small effusion.\n IMPRESSIONS: Effusion.\n",
                           {"findings": "Small effusion.", "impression": "Effusion."}),
    "conclusions, impresson": (" FINDNGS: Clear.\n CONCLUSIONS: Normal.\n IMPRESSON: Later.\n",
                               {"findings": "Clear.", "impression": "Normal."}),
    "wet-read preamble":
        ("                                 FINAL REPORT\n WET READ: ___ ___ 10:00 PM\n  No "
         "pneumothorax seen.\n ________________________________\n EXAMINATION: CHEST (PA AND "
         "LAT)\n INDICATION: ___ year old woman with dyspnea.\n COMPARISON: ___.\n FINDINGS:\n "
         "The heart is normal in size.\n IMPRESSION:\n No acute process.\n",
         {"findings": "The heart is normal in size.", "impression": "No acute process."}),
    "provisional findings impression":
        (" PROVISIONAL FINDINGS IMPRESSION (PFI): ___ ___ ___ 2:15 PM\n  Possible RLL pneumonia.\n "
         "FINDINGS: Right lower lobe opacity.\n IMPRESSION: Pneumonia.\n",
         {"findings": "Right lower lobe opacity.", "impression": "Pneumonia."}),
    "trailing notification":
        (" IMPRESSION: Right pneumothorax.\n\n NOTIFICATION: The findings were discussed with "
         "Dr. ___ by Dr. ___ on the telephone on ___ at 10:24 AM.\n",
         {"impression": "Right pneumothorax."}),
    "trailing recommendation(s)": (LOWER, {
        "findings": "Small left pleural effusion is unchanged. Note: the patient was rotated.",
        "impression": "Stable small left effusion."
    }),
    "addendum with a second impression":
        (" FINDINGS: Clear lungs.\n IMPRESSION: Normal.\n ADDENDUM: Reviewed again.\n IMPRESSION: "
         "Still normal.\n", {"findings": "Clear lungs.", "impression": "Normal."}),
    "crlf and an empty findings section":
        (" FINDINGS:\r\n\r\n IMPRESSION: Normal.\r\n", {"findings": "", "impression": "Normal."}),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_sections_of_report_shapes(shape):
  report, expected = SHAPES[shape]
  got = {name: " ".join(text.split()) for name, text in mimic_cxr.sections(report).items()}
  assert got == expected


def test_findings_and_impression_and_conclusion_reports_are_kept(tmp_path):
  _write(tmp_path / "manual")
  study = tmp_path / "manual" / "files" / "p10" / "p10000032"
  (study / "s50000003.txt").write_text(SHAPES["findings and impression"][0])  # d4
  (study / "s50000007.txt").write_text(SHAPES["conclusion only"][0] + "\n Extra: two words.")  # d8
  b, report = builders.build("mimic_cxr", str(tmp_path / "manual"), str(tmp_path / "out"))
  assert report["train"]["written"] == 4 and "no findings or impression" not in report["train"]
  train = _ids(b, "train")
  assert train["d4"]["texts"] == [b"Low lung volumes. No pneumothorax."]
  assert train["d8"]["texts"] == [b"No pneumonia. Extra: two words."]


@pytest.mark.parametrize("row, message", [
    ("10000032,50000009,1.0", r"chexpert\.csv: line 5: fewer fields than the 16 columns"),
    ("10000032,50000009" + ",yes" * 14, r"chexpert\.csv: line 5: Atelectasis is 'yes'; expected"),
    ("10000032,50000009" + ",2.0" * 14, r"chexpert\.csv: line 5: Atelectasis is '2.0'; expected"),
])
def test_bad_label_row_is_a_one_line_error(tmp_path, row, message):
  _write(tmp_path / "manual")
  path = tmp_path / "manual" / "mimic-cxr-2.0.0-chexpert.csv"
  path.write_text(path.read_text() + row + "\n")
  with pytest.raises(ValueError, match=message):
    builders.build("mimic_cxr", str(tmp_path / "manual"), str(tmp_path / "out"))


def test_bad_split_and_metadata_rows_are_one_line_errors(tmp_path):
  _write(tmp_path / "manual")
  split = tmp_path / "manual" / "mimic-cxr-2.0.0-split.csv"
  split.write_text(split.read_text().replace("d9,50000008,10000032,train", "d9,50000008,10000032,"
                                             "training"))
  with pytest.raises(ValueError, match=r"split\.csv: line 10: split is 'training'; expected one"):
    builders.build("mimic_cxr", str(tmp_path / "manual"), str(tmp_path / "out"))
  split.write_text(split.read_text().replace("training", "train"))
  metadata = tmp_path / "manual" / "mimic-cxr-2.0.0-metadata.csv"
  metadata.write_bytes(metadata.read_bytes() + b"d\xff" + b",1" * 11 + b"\n")
  with pytest.raises(ValueError, match=r"metadata\.csv: line 13: not UTF-8"):
    builders.build("mimic_cxr", str(tmp_path / "manual"), str(tmp_path / "out2"))


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
