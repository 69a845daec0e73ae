"""RSNA Pneumonia: a tiny copy in the distributed layout (box rows aggregated per patient, DICOM
images written with pydicom) is split by a hash of each patient id, and everything unusable is
counted."""
import codecs

import numpy as np
import pytest

from mpma_jax.data import builders, images
from mpma_jax.data.builders.rsna_pneumonia import RsnaPneumonia
from tests.data.test_images import dicom_bytes

HEADER = "patientId,x,y,width,height,Target\n"
# RsnaPneumonia.split_of (the SHA-256 of each id) puts these ids into validation and test; the
# other 10 (the empty id included) are train.
VALIDATION, TEST = ["pid00", "pid01", "pid05", "pid11"], ["pid06"]
TRAIN = ["", "pid02", "pid03", "pid04", "pid07", "pid08", "pid09", "pid10", "pid12", "pid13"]
BOX = "264.0,152.0,213.0,379.0"
# patient -> (rows: the x,y,width,height,Target after the id; image: 'ok' | 'corrupt' | None)
PATIENTS = {
    "": ([f"{BOX},1"], "ok"),
    "pid10": ([",,,,0"], None),
    "pid13": ([f"{BOX},1"], "corrupt"),
    "pid09": ([",,,,2"], "ok"),
    "pid04": ([f"{BOX},1", "562.0,152.0,256.0,453.0,1", "100.0,100.0,10.0,10.0,1"], "ok"),
    "pid01": ([",,,,0"], "ok"),
    "pid03": ([",,,,0"], "ok"),
    "pid11": ([f"{BOX},1"], "ok"),
    "pid00": ([",,,,0"], "ok"),
    "pid12": ([",,,,0.0"], "ok"),
    "pid07": ([f"{BOX},1.0"], "ok"),
    "pid05": ([f"{BOX},1", "600.0,100.0,50.0,80.0,1"], "ok"),
    "pid06": ([",,,,0"], "ok"),
    "pid08": ([",,,,0"], "ok"),
    "pid02": ([",,,,0"], "corrupt"),
}


def _pixels(i: int) -> np.ndarray:
  return (np.arange(48, dtype=np.uint8).reshape(6, 8) * (i + 1)) % 251


def _write(manual, patients):
  """Writes the CSV (rows interleaved as in the real file: one patient's boxes are adjacent, the
  patients unsorted) and the DICOMs; returns patientId -> DICOM bytes."""
  (manual / "stage_2_train_images").mkdir(parents=True)
  lines, written = [], {}
  for i, (patient, (rows, image)) in enumerate(sorted(patients.items(), reverse=True)):
    lines += [f"{patient},{row}\n" for row in rows]
    if image is None:
      continue
    data = dicom_bytes(_pixels(i))
    if image == "corrupt":
      data = data[:len(data) // 2]  # truncated pixel data
    (manual / "stage_2_train_images" / f"{patient}.dcm").write_bytes(data)
    written[patient] = data
  (manual / "stage_2_train_labels.csv").write_text(HEADER + "".join(lines))
  return written


def test_rsna_pneumonia_tiny_copy(tmp_path):
  manual = tmp_path / "manual"
  data = _write(manual, PATIENTS)
  b, report = builders.build("rsna_pneumonia", str(manual), str(tmp_path / "out"))
  assert {p: RsnaPneumonia.split_of(p) for p in PATIENTS} == {
      **dict.fromkeys(TRAIN, "train"), **dict.fromkeys(VALIDATION, "validation"),
      **dict.fromkeys(TEST, "test")
  }
  assert report == {
      "train": {
          "written": 5, "skipped": {
              "bad label value": 1, "empty patient id": 1, "missing image": 1, "unreadable image": 2
          }
      }, "validation": {"written": 4, "skipped": {}}, "test": {"written": 1, "skipped": {}}
  }
  assert list(b.info.metadata["class_names"]) == ["normal", "pneumonia"]
  skipped = {"", "pid10", "pid13", "pid09", "pid02"}
  expected_ids = {
      "train": set(TRAIN) - skipped, "validation": set(VALIDATION) - skipped,
      "test": set(TEST) - skipped
  }
  for split, ids in expected_ids.items():
    source = b.as_data_source(split)
    got = {source[i]["id"].decode(): source[i] for i in range(len(source))}
    assert set(got) == ids
    for patient, ex in got.items():
      target = max(int(float(row.split(",")[-1])) for row in PATIENTS[patient][0])
      assert ex["label"] == target
      np.testing.assert_array_equal(ex["labels"], np.eye(2, dtype=np.float32)[target])
      assert ex["text"] == b""
      assert ex["image"] == data[patient]  # the DICOM bytes, decoded when read
  train = {ex["id"].decode(): ex for ex in (b.as_data_source("train")[i] for i in range(5))}
  assert train["pid04"]["label"] == 1 and train["pid03"]["label"] == 0  # three boxes -> one
  pixels = images.decode(train["pid04"]["image"])
  assert pixels.shape == (6, 8, 3) and pixels.dtype == np.uint8
  assert pixels[0, 0, 0] == 0 and pixels.max() == 255  # 8-bit MONOCHROME2, min-max


def _splits(b):
  """patient id -> the split the build wrote it to."""
  out = {}
  for split in ("train", "validation", "test"):
    source = b.as_data_source(split)
    out.update({source[i]["id"].decode(): split for i in range(len(source))})
  return out


def test_a_copy_lacking_some_patients_leaves_every_other_patient_in_its_split(tmp_path):
  ids = [f"p{i:03d}" for i in range(60)]
  _write(tmp_path / "full", {p: ([",,,,0"], "ok") for p in ids})
  full, _ = builders.build("rsna_pneumonia", str(tmp_path / "full"), str(tmp_path / "out_full"))
  kept = [p for i, p in enumerate(ids) if i % 7 != 3]  # 9 patients spread over the id order gone
  _write(tmp_path / "part", {p: ([",,,,0"], "ok") for p in kept})
  part, _ = builders.build("rsna_pneumonia", str(tmp_path / "part"), str(tmp_path / "out_part"))
  before, after = _splits(full), _splits(part)
  assert set(after) == set(kept) and len(set(before.values())) == 3
  assert after == {p: before[p] for p in kept}
  assert before == {p: RsnaPneumonia.split_of(p) for p in ids}


def test_split_fractions_are_class_attributes():
  assert (RsnaPneumonia.VAL_FRACTION, RsnaPneumonia.TEST_FRACTION) == (0.1, 0.1)

  class Quarter(RsnaPneumonia):
    VAL_FRACTION = TEST_FRACTION = 0.25

  ids = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(4000)]  # patientId's UUID form
  for cls, expected in ((RsnaPneumonia, 400), (Quarter, 1000)):
    splits = [cls.split_of(p) for p in ids]
    for split in ("validation", "test"):
      assert abs(splits.count(split) - expected) < 4 * expected**0.5, (cls, split)


def test_a_split_left_empty_is_a_clear_error(tmp_path):
  _write(tmp_path, {p: ([",,,,1"], "ok") for p in ("a", "b")})  # both train by their hash
  with pytest.raises(ValueError, match="split 'validation' has no usable examples"):
    builders.build("rsna_pneumonia", str(tmp_path), str(tmp_path / "out"))


def test_bad_bytes_and_rows_of_the_labels_file(tmp_path):
  (tmp_path / "stage_2_train_images").mkdir()
  for p in "abcd":  # a, b: train; c: test; d: validation (by their hash)
    (tmp_path / "stage_2_train_images" / f"{p}.dcm").write_bytes(dicom_bytes(_pixels(0)))
  path = tmp_path / "stage_2_train_labels.csv"
  # 'a' + 0x81 (not UTF-8) is train too; b's second row has a Target that is not UTF-8.
  path.write_bytes(codecs.BOM_UTF8 + HEADER.encode() +
                   b"a,,,,,0\nb,,,,,1\nc,,,,,0\nd,,,,,1\na\x81,,,,,0\nb,,,,,\x81\n")
  _, report = builders.build("rsna_pneumonia", str(tmp_path), str(tmp_path / "out"))
  assert RsnaPneumonia.split_of("a\udc81") == "train"
  assert report == {
      "train": {"written": 1, "skipped": {"non-UTF-8 text": 1, "bad label value": 1}},
      "validation": {"written": 1, "skipped": {}}, "test": {"written": 1, "skipped": {}}
  }
  path.write_bytes(HEADER.encode() + b"a,,,,,0\nb,,,,," + b"1" * 140000 + b"\n")
  with pytest.raises(ValueError, match=r"stage_2_train_labels\.csv: line 3: field larger than"):
    builders.build("rsna_pneumonia", str(tmp_path), str(tmp_path / "out2"))


@pytest.mark.parametrize("missing", ["stage_2_train_labels.csv", "stage_2_train_images"])
def test_wrong_manual_dir_names_the_expected_file(tmp_path, missing):
  (tmp_path / "stage_2_train_images").mkdir()
  (tmp_path / "stage_2_train_labels.csv").write_text(HEADER + "a,,,,,0\n")
  path = tmp_path / missing
  path.rmdir() if path.is_dir() else path.unlink()
  with pytest.raises(FileNotFoundError, match=missing):
    builders.build("rsna_pneumonia", str(tmp_path), str(tmp_path / "out"))


def test_real_chest_radiograph_goes_through_build_and_pipeline(tmp_path):
  """The real PA chest radiograph of pydicom-data (MONOCHROME1, 1955 x 1841, 15-bit) as three RSNA
  patients: built, then batched by the downstream pipeline at 288 px."""
  import ml_collections
  from pydicom.data import get_testdata_file

  from mpma_jax.data import downstream, synthetic
  from mpma_jax.data import tokenizer as tokenizers
  real = open(get_testdata_file("RG1_UNCI.dcm"), "rb").read()
  manual = tmp_path / "rsna"
  (manual / "stage_2_train_images").mkdir(parents=True)
  patients = ("real0", "real1", "real9")  # train, validation, test by their hash
  rows = [HEADER] + [f"{p},,,,,{i % 2}\n" for i, p in enumerate(patients)]
  (manual / "stage_2_train_labels.csv").write_text("".join(rows))
  for p in patients:
    (manual / "stage_2_train_images" / f"{p}.dcm").write_bytes(real)
  data_dir = str(tmp_path / "data")
  b, report = builders.build("rsna_pneumonia", str(manual), data_dir)
  assert {s: r["written"] for s, r in report.items()} == {"train": 1, "validation": 1, "test": 1}
  tokenizers.train_wordpiece(synthetic.report_corpus(50), 256, str(tmp_path / "tok"))
  config = ml_collections.ConfigDict(
      {"eval": {"batch_size": 4}, "data": {"read_threads": 0, "read_buffer": 4}})
  decode = downstream.Decode("image_classification", str(tmp_path / "tok"), 288, 8,
                             class_names=b.info.metadata["class_names"], labels=["pneumonia"])
  (batch,) = list(downstream.eval_batches(config, b, "train", np.arange(1), decode))
  assert batch["valid"].tolist() == [1, 0, 0, 0]  # one record, padded to the batch size
  assert batch["targets"][0, 0] == b.as_data_source("train")[0]["labels"][1]
  image = batch["image"][0]  # [288, 288, 3]
  assert image.shape == (288, 288, 3) and image.dtype == np.uint8 and batch["valid"][0] == 1
  assert np.array_equal(image, images.load(real, 288))
  assert image.min() < 30 and image.max() > 225
  # MONOCHROME1 inverted: the spine (centre column) is brighter than the lungs beside it.
  assert image[100:200, 134:154].mean() > image[100:200, 60:90].mean() + 20
