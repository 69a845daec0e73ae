"""RSNA Pneumonia: a tiny copy in the distributed layout (box rows aggregated per patient, DICOM
images written with pydicom) is split by patient with the fixed seed, and everything unusable is
counted."""
import numpy as np
import pytest

from mpma_jax.data import builders, images
from tests.data.test_images import dicom_bytes

HEADER = "patientId,x,y,width,height,Target\n"
# With SEED 42 the 15 sorted patient ids (14 + the empty one) are permuted to: validation = the
# first 2, test = the next 2, train = the other 11.
VALIDATION, TEST = ["pid05", "pid06"], ["pid08", "pid02"]
TRAIN = [
    "", "pid10", "pid13", "pid09", "pid04", "pid01", "pid03", "pid11", "pid00", "pid12", "pid07"
]
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
  assert report == {
      "train": {
          "written": 7, "skipped": {
              "bad label value": 1, "empty patient id": 1, "missing image": 1, "unreadable image": 1
          }
      }, "validation": {"written": 2, "skipped": {}},
      "test": {"written": 1, "skipped": {"unreadable image": 1}}
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
  train = {ex["id"].decode(): ex for ex in (b.as_data_source("train")[i] for i in range(7))}
  assert train["pid04"]["label"] == 1 and train["pid01"]["label"] == 0  # three boxes -> one
  pixels = images.decode(train["pid04"]["image"])
  assert pixels.shape == (6, 8, 3) and pixels.dtype == np.uint8
  assert pixels[0, 0, 0] == 0 and pixels.max() == 255  # 8-bit MONOCHROME2, min-max


def test_three_patients_give_one_per_split_and_two_are_too_few(tmp_path):
  three = {p: ([",,,,0"], "ok") for p in ("a", "b", "c")}
  _write(tmp_path / "three", three)
  b, report = builders.build("rsna_pneumonia", str(tmp_path / "three"), str(tmp_path / "out3"))
  assert {s: r["written"] for s, r in report.items()} == {"train": 1, "validation": 1, "test": 1}
  # sorted ['a', 'b', 'c'] permuted by default_rng(42) -> ['c', 'b', 'a']
  assert [b.as_data_source(s)[0]["id"] for s in ("validation", "test", "train")
         ] == [b"c", b"b", b"a"]
  _write(tmp_path / "two", {p: ([",,,,1"], "ok") for p in ("a", "b")})
  with pytest.raises(ValueError, match="no usable examples"):
    builders.build("rsna_pneumonia", str(tmp_path / "two"), str(tmp_path / "out2"))


def test_split_fractions_and_seed_are_class_attributes(tmp_path):
  from mpma_jax.data.builders.rsna_pneumonia import RsnaPneumonia
  assert (RsnaPneumonia.SEED, RsnaPneumonia.VAL_FRACTION, RsnaPneumonia.TEST_FRACTION) == (42, 0.1,
                                                                                           0.1)
  ids = [f"p{i:03d}" for i in range(100)]
  _write(tmp_path / "m", {p: ([",,,,0"], "ok") for p in ids})
  _, report = builders.build("rsna_pneumonia", str(tmp_path / "m"), str(tmp_path / "out"))
  assert {s: r["written"] for s, r in report.items()} == {"train": 80, "validation": 10, "test": 10}


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
  rows = [HEADER] + [f"real{i},,,,,{i % 2}\n" for i in range(3)]
  (manual / "stage_2_train_labels.csv").write_text("".join(rows))
  for i in range(3):
    (manual / "stage_2_train_images" / f"real{i}.dcm").write_bytes(real)
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
