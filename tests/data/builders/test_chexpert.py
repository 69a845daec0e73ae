"""CheXpert-v1.0-small: a tiny copy in the distributed layout keeps frontal and lateral views with
their 14 raw label values, reads label columns by name, and counts everything unusable."""
import csv
import math

import numpy as np
import pytest

from mpma_jax.data import builders, images
from mpma_jax.data.builders import chexpert

DIR = "CheXpert-v1.0-small"
META = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
# (path under DIR, view, {label: value as written}, image: 'ok' | 'corrupt' | None = missing)
TRAIN = [
    ("train/patient00001/study1/view1_frontal.jpg", "Frontal",
     {"No Finding": "1.0", "Support Devices": "1.0", "Lung Opacity": "0.0"}, "ok"),
    ("train/patient00001/study1/view2_lateral.jpg", "Lateral",
     {"Cardiomegaly": "-1.0", "Edema": "1.0", "Pleural Effusion": "0.0"}, "ok"),
    ("train/patient00002/study1/view1_frontal.jpg", "Frontal", {}, "ok"),  # all empty -> NaN
    ("train/patient00002/study2/view1_frontal.jpg", "Frontal", {"Fracture": "1"}, None),
    ("train/patient00003/study1/view1_frontal.jpg", "Frontal", {"Edema": "1.0"}, "corrupt"),
    ("train/patient00004/study1/view1_frontal.jpg", "Frontal", {"Edema": "2.0"}, "ok"),
    ("train/patient00005/study1/view1_frontal.jpg", "Frontal", {"Pneumonia": "yes"}, "ok"),
    ("train/patient00001/study1/view1_frontal.jpg", "Frontal", {}, "ok"),  # a repeated row
]
VALID = [
    ("valid/patient64541/study1/view1_frontal.jpg", "Frontal",
     {"Atelectasis": "1.0", "Consolidation": "0.0", "No Finding": "0.0"}, "ok"),
    ("valid/patient64542/study1/view2_lateral.jpg", "Lateral", {"Pneumothorax": "0.0"}, "ok"),
]


def _write(root, name, rows, label_columns):
  with open(root / name, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(META + list(label_columns))
    for i, (path, view, labels, image) in enumerate(rows):
      writer.writerow([f"{DIR}/{path}", "Female", 60 + i, view, "AP" if view == "Frontal" else ""] +
                      [labels.get(n, "") for n in label_columns])
      file = root / path
      file.parent.mkdir(parents=True, exist_ok=True)
      data = images.encode_jpeg(np.full((12, 10), 20 * i % 256, np.uint8))  # grey, as distributed
      if image == "ok" and not file.exists():
        file.write_bytes(data)
      elif image == "corrupt":
        file.write_bytes(data[:len(data) // 2])


def _manual(tmp_path):
  root = tmp_path / "manual" / DIR
  root.mkdir(parents=True)
  _write(root, "train.csv", TRAIN, chexpert.LABELS)
  _write(root, "valid.csv", VALID, chexpert.LABELS[::-1])  # columns are read by name
  return root


EXPECTED = {
    "train": {
        "written": 3, "skipped": {
            "bad label value": 2, "duplicate": 1, "missing image": 1, "unreadable image": 1
        }
    }, "validation": {"written": 2, "skipped": {}}
}


def _expected_labels(labels):
  return np.array([float(labels[n]) if n in labels else math.nan for n in chexpert.LABELS],
                  np.float32)


def test_chexpert_tiny_copy(tmp_path):
  root = _manual(tmp_path)
  b, report = builders.build("chexpert", str(root.parent), str(tmp_path / "out"))
  assert report == EXPECTED
  assert list(b.info.metadata["class_names"]) == list(chexpert.LABELS)
  for split, rows in (("train", TRAIN[:3]), ("validation", VALID)):
    source = b.as_data_source(split)
    got = {source[i]["id"].decode(): source[i] for i in range(len(source))}
    assert set(got) == {path for path, *_ in rows}  # frontal and lateral views both kept
    for path, _, labels, _ in rows:
      ex = got[path]
      assert ex["label"] == -1 and ex["text"] == b""
      np.testing.assert_array_equal(ex["labels"], _expected_labels(labels))  # NaN == NaN here
      assert ex["image"] == (root / path).read_bytes()
  train = {ex["id"].decode(): ex for ex in (b.as_data_source("train")[i] for i in range(3))}
  lateral = train["train/patient00001/study1/view2_lateral.jpg"]["labels"]
  assert lateral[chexpert.LABELS.index("Cardiomegaly")] == -1  # uncertain kept as -1
  assert np.isnan(train["train/patient00002/study1/view1_frontal.jpg"]["labels"]).all()
  image = train["train/patient00001/study1/view2_lateral.jpg"]["image"]
  assert images.decode(image).shape == (12, 10, 3)


def test_manual_dir_may_be_the_chexpert_directory_itself(tmp_path):
  root = _manual(tmp_path)
  _, report = builders.build("chexpert", str(root), str(tmp_path / "out"))
  assert report == EXPECTED


def test_competition_labels_are_among_the_classes():
  assert len(chexpert.LABELS) == 14 and set(chexpert.COMPETITION) < set(chexpert.LABELS)
  assert chexpert.Chexpert.CLASS_NAMES == chexpert.LABELS


@pytest.mark.parametrize("missing", ["train.csv", "valid.csv"])
def test_wrong_manual_dir_names_the_expected_file(tmp_path, missing):
  root = _manual(tmp_path)
  (root / missing).unlink()
  with pytest.raises(FileNotFoundError, match=missing):
    builders.build("chexpert", str(root.parent), str(tmp_path / "out"))


def test_a_missing_label_column_is_an_error(tmp_path):
  root = _manual(tmp_path)
  _write(root, "valid.csv", VALID, chexpert.LABELS[:-1])
  with pytest.raises(ValueError, match="Support Devices"):
    builders.build("chexpert", str(root.parent), str(tmp_path / "out"))


def test_truncated_long_and_non_utf8_rows_are_counted(tmp_path):
  root = _manual(tmp_path)
  frontal = f"{DIR}/valid/patient64541/study1/view1_frontal.jpg".encode()
  (root / "valid.csv").write_bytes((root / "valid.csv").read_bytes() + b"\r\n".join([
      frontal + b",Female,60,Frontal,AP,1.0",  # cut after the first label
      frontal + b",Female,60,Frontal,AP" + b",0.0" * 15,
      f"{DIR}/valid/patient6454\xff/study1/view1_frontal.jpg".encode("latin-1") +
      b",Female,60,Frontal,AP" + b",0.0" * 14
  ]) + b"\r\n")
  _, report = builders.build("chexpert", str(root.parent), str(tmp_path / "out"))
  assert report["validation"] == {
      "written": 2, "skipped": {"truncated row": 1, "too many fields": 1, "non-UTF-8 text": 1}
  }
  (root / "valid.csv").write_bytes((root / "valid.csv").read_bytes() + b"x" * 140000 + b"\n")
  with pytest.raises(ValueError, match=r"valid\.csv: line 7: field larger than field limit"):
    builders.build("chexpert", str(root.parent), str(tmp_path / "out2"))
