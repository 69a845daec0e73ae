"""ROCO v1, ROCOv2 and the ROCO retrieval draw on tiny copies in the distributed layouts."""
import codecs

import numpy as np
import pytest

from mpma_jax.data import builders, images
from mpma_jax.data.builders import roco

GOOD = "Axial CT of the abdomen shows a hypodense liver lesion."


def _jpeg(i: int) -> bytes:
  return images.encode_jpeg(np.full((20, 24, 3), 10 * i, np.uint8))


def _roco_split(root, split, rows):
  """rows: (id, caption or None for a malformed line, image: 'ok' | 'corrupt' | None)."""
  d = root / "data" / split / "radiology"
  (d / "images").mkdir(parents=True)
  lines = []
  for i, (roco_id, caption, image) in enumerate(rows):
    lines.append(f"{roco_id}\t {caption}" if caption is not None else roco_id)
    if image == "ok":
      (d / "images" / f"{roco_id}.jpg").write_bytes(_jpeg(i))
    elif image == "corrupt":
      (d / "images" / f"{roco_id}.jpg").write_bytes(_jpeg(i)[:30])
  (d / "captions.txt").write_text("\n".join(lines) + "\n")
  (d / "dlinks.txt").write_text("".join(f"{r[0]}\twget x PMC1.tar.gz\tf.jpg\n" for r in rows))
  (d / "licences.txt").write_text("ROCO_ID,PMC_ID,CC\n")


def _roco(root):
  _roco_split(root, "train", [("ROCO_00001", GOOD, "ok"),
                              ("ROCO_00002", "Chest radiograph, normal heart size.", "ok"),
                              ("ROCO_00003", GOOD, None), ("ROCO_00004", GOOD, "corrupt"),
                              ("ROCO_00005", "CT scan", "ok"), ("ROCO_00006", None, "ok")])
  _roco_split(root, "validation", [("ROCO_00011", GOOD, "ok")])
  _roco_split(root, "test", [(f"ROCO_{20 + i:05d}", f"{GOOD} Case {i}.", "ok") for i in range(8)] +
              [("ROCO_00040", "  ", "ok")])


def test_roco_v1(tmp_path):
  _roco(tmp_path / "m")
  b, report = builders.build("roco", str(tmp_path / "m"), str(tmp_path / "out"))
  assert report == {
      "train": {
          "written": 2, "skipped": {
              "missing image": 1, "unreadable image": 1, "text too short": 1, "malformed line": 1
          }
      }, "validation": {"written": 1, "skipped": {}},
      "test": {"written": 8, "skipped": {"empty text": 1}}
  }
  train = b.as_data_source("train")
  got = {train[i]["id"]: train[i] for i in range(len(train))}
  assert list(got[b"ROCO_00001"]["texts"]) == [GOOD.encode()]  # the space after the tab is gone
  assert got[b"ROCO_00002"]["image"] == _jpeg(1)


def test_roco_retrieval_draw_is_seeded_and_from_the_test_split(tmp_path, monkeypatch):
  _roco(tmp_path / "m")

  class Five(roco.RocoRetrieval):
    NUM_PAIRS = 5

  monkeypatch.setitem(builders.BUILDERS, "roco_retrieval_5", Five)
  b, report = builders.build("roco_retrieval_5", str(tmp_path / "m"), str(tmp_path / "out"))
  assert report == {"test": {"written": 5, "skipped": {"empty text": 1}}}
  source = b.as_data_source("test")
  ids = sorted(source[i]["id"].decode() for i in range(len(source)))
  candidates = [f"ROCO_{20 + i:05d}" for i in range(8)]
  want = sorted(candidates[i] for i in np.random.default_rng(42).choice(8, 5, replace=False))
  assert ids == want
  b2, _ = builders.build("roco_retrieval_5", str(tmp_path / "m"), str(tmp_path / "out2"))
  again = b2.as_data_source("test")
  assert sorted(again[i]["id"].decode() for i in range(len(again))) == ids


def _rocov2(root):
  for prefix, n in (("train", 4), ("valid", 1), ("test", 1)):
    (root / prefix).mkdir(parents=True)
    rows = ["ID,Caption"]
    for i in range(n):
      image_id = f"ROCOv2_2023_{prefix}_{i + 1:06d}"
      rows.append(f'{image_id},"{GOOD}, with a comma"')
      if not (prefix == "train" and i == 2):  # one missing image
        (root / prefix / f"{image_id}.jpg").write_bytes(_jpeg(i))
    if prefix == "train":
      rows.append("ROCOv2_2023_train_000009,x")
      (root / prefix / "ROCOv2_2023_train_000009.jpg").write_bytes(_jpeg(9))
    (root / f"{prefix}_captions.csv").write_text("\n".join(rows) + "\n")


def test_rocov2(tmp_path):
  _rocov2(tmp_path / "m")
  b, report = builders.build("rocov2", str(tmp_path / "m"), str(tmp_path / "out"))
  assert report == {
      "train": {"written": 3, "skipped": {"missing image": 1, "text too short": 1}},
      "validation": {"written": 1, "skipped": {}}, "test": {"written": 1, "skipped": {}}
  }
  valid = b.as_data_source("validation")[0]
  assert valid["id"] == b"ROCOv2_2023_valid_000001"
  assert list(valid["texts"]) == [f"{GOOD}, with a comma".encode()]


def test_wrong_layouts_name_the_expected_file(tmp_path):
  _roco(tmp_path / "m")
  (tmp_path / "m" / "data" / "validation" / "radiology" / "captions.txt").unlink()
  with pytest.raises(FileNotFoundError, match="data/validation/radiology/captions.txt"):
    builders.build("roco", str(tmp_path / "m"), str(tmp_path / "out"))
  _rocov2(tmp_path / "v2")
  (tmp_path / "v2" / "valid_captions.csv").write_text("id,text\nx,y\n")
  with pytest.raises(ValueError, match="valid_captions.csv: expected columns ID,Caption"):
    builders.build("rocov2", str(tmp_path / "v2"), str(tmp_path / "out2"))
  with pytest.raises(FileNotFoundError, match="test_captions.csv"):
    (tmp_path / "v2" / "test_captions.csv").unlink()
    builders.build("rocov2", str(tmp_path / "v2"), str(tmp_path / "out3"))


def test_roco_v1_reads_a_bom_and_counts_non_utf8(tmp_path):
  _roco(tmp_path / "m")
  captions = tmp_path / "m" / "data" / "train" / "radiology" / "captions.txt"
  lines = captions.read_bytes().replace(b"\n", b"\r\n")  # CRLF line ends too
  captions.write_bytes(codecs.BOM_UTF8 + lines + b"ROCO_\xff0007\t " + GOOD.encode() + b"\r\n" +
                       b"ROCO_00008\t Caf\xe9 sign on an axial CT image.\r\n")
  _, report = builders.build("roco", str(tmp_path / "m"), str(tmp_path / "out"))
  assert report["train"] == {
      "written": 2, "skipped": {
          "missing image": 1, "unreadable image": 1, "text too short": 1, "malformed line": 1,
          "non-UTF-8 text": 2
      }
  }


def test_rocov2_csv_is_parsed_from_the_file(tmp_path):
  """Quoted line breaks, U+2028, U+0085 and form feeds stay inside their caption (as spaces), a BOM
  and CRLF line ends are read, and a caption that is not UTF-8 or a short row is counted."""
  root = tmp_path / "m"
  _rocov2(root)
  captions = {
      1: '"Axial CT\u2028of the abdomen\x85with\x0ccontrast, arterial phase."'.encode(),
      2: b'"First line\r\nsecond line, with a comma."',
      3: b"Caption of one field without quotes",
      4: b'"Caf\xe9 sign on an axial CT image."',  # Latin-1, not UTF-8
      5: b"",  # no Caption field at all
  }
  rows = [codecs.BOM_UTF8 + b"ID,Caption"]
  for i, caption in captions.items():
    image_id = f"ROCOv2_2023_train_{i:06d}"
    rows.append(image_id.encode() + (b"," + caption if caption else b""))
    (root / "train" / f"{image_id}.jpg").write_bytes(_jpeg(i))
  (root / "train_captions.csv").write_bytes(b"\r\n".join(rows) + b"\r\n")
  b, report = builders.build("rocov2", str(root), str(tmp_path / "out"))
  assert report["train"] == {"written": 3, "skipped": {"non-UTF-8 text": 1, "malformed line": 1}}
  train = b.as_data_source("train")
  got = {train[i]["id"].decode(): [t.decode() for t in train[i]["texts"]] for i in range(3)}
  assert got == {
      "ROCOv2_2023_train_000001": ["Axial CT of the abdomen with contrast, arterial phase."],
      "ROCOv2_2023_train_000002": ["First line second line, with a comma."],
      "ROCOv2_2023_train_000003": ["Caption of one field without quotes"],
  }
  (root / "train_captions.csv").write_text(f"ID,Caption\nA,{GOOD}\nB,{'x' * 140000}\n")
  with pytest.raises(ValueError, match=r"train_captions\.csv: line 3: field larger than field"):
    builders.build("rocov2", str(root), str(tmp_path / "out2"))
