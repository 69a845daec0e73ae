"""What `mpma-data build` records and how it treats a second build: duplicates within a split are
kept once and counted, keys in several splits are reported, a rebuild from the same files is
`reused`, one from changed files is refused naming the change (unless --overwrite), and every
refusal is one line with exit status 2."""
import json
import os

import numpy as np
import pytest

from mpma_jax.cli import data as cli
from mpma_jax.data import images


def _roco(root, captions=None):
  """ROCO v1's layout with 3 pairs per split (captions: split -> list of lines)."""
  rng = np.random.default_rng(0)
  for split in ("train", "validation", "test"):
    d = root / "data" / split / "radiology"
    (d / "images").mkdir(parents=True, exist_ok=True)
    lines = (captions or {}).get(split) or [
        f"ROCO_{split[:2]}{i}\t Axial CT image number {i} of the {split} split." for i in range(3)
    ]
    (d / "captions.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
      roco_id = line.split("\t")[0]
      (d / "images" / f"{roco_id}.jpg").write_bytes(
          images.encode_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)))


def build(capsys, *args):
  code = cli.main(["build", "roco", *args])
  out, err = capsys.readouterr()
  return code, (json.loads(out) if code == 0 else None), err


def test_duplicates_kept_once_and_keys_across_splits_reported(tmp_path, capsys):
  line = "ROCO_00001\t Axial CT of the chest shows a nodule."
  _roco(
      tmp_path / "m",
      {"train": [line, line, "ROCO_00002\t Chest radiograph with effusion seen."], "test": [line]})
  code, result, err = build(capsys, "--manual_dir", str(tmp_path / "m"), "--data_dir",
                            str(tmp_path / "out"))
  assert code == 0, err
  assert result["status"] == "built"
  assert result["splits"]["train"] == {"written": 2, "skipped": {"duplicate": 1}}
  assert result["duplicates_across_splits"] == {"train/test": 1}
  record = json.load(open(os.path.join(result["data_dir"], "build_report.json")))
  assert record["duplicates_across_splits"] == {"train/test": 1}
  assert record["splits"] == result["splits"] and record["builder_version"] == "1.0.0"


def test_rebuild_is_reused_refused_when_the_source_changed_and_overwritten(tmp_path, capsys):
  _roco(tmp_path / "m")
  args = ["--manual_dir", str(tmp_path / "m"), "--data_dir", str(tmp_path / "out")]
  code, first, _ = build(capsys, *args)
  assert code == 0 and first["status"] == "built"
  code, second, _ = build(capsys, *args)
  assert code == 0 and second["status"] == "reused" and second["splits"] == first["splits"]
  # An image deleted and a caption file edited: refused, naming both.
  os.remove(tmp_path / "m" / "data" / "test" / "radiology" / "images" / "ROCO_te0.jpg")
  captions = tmp_path / "m" / "data" / "train" / "radiology" / "captions.txt"
  captions.write_text(captions.read_text().replace("number 1", "number one"))
  code, _, err = build(capsys, *args)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert "already built" in err and "1 file removed ('data/test/radiology/images/ROCO_te0.jpg')" \
      in err and "1 file changed ('data/train/radiology/captions.txt')" in err
  assert "--overwrite" in err
  # Another dataset's folder as manual_dir: refused too.
  _roco(tmp_path / "other", {"train": ["ROCO_9\t A different caption entirely here."]})
  code, _, err = build(capsys, "--manual_dir", str(tmp_path / "other"), "--data_dir",
                       str(tmp_path / "out"))
  assert code == 2 and "from another manual_dir" in err and "1 file added" in err
  # --overwrite builds again from what is there now.
  code, third, _ = build(capsys, *args, "--overwrite")
  assert code == 0 and third["status"] == "built"
  assert third["splits"]["test"] == {"written": 2, "skipped": {"missing image": 1}}
  code, fourth, _ = build(capsys, *args)
  assert code == 0 and fourth["status"] == "reused"


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_bad_data_dir_is_one_line(tmp_path, capsys, kind):
  _roco(tmp_path / "m")
  data_dir = tmp_path / "out"
  if kind == "file":
    data_dir.write_text("not a directory")
  else:
    data_dir.mkdir()
    data_dir.chmod(0o500)
    if os.access(data_dir, os.W_OK):  # root ignores permissions
      pytest.skip("running as root: a read-only directory is still writable")
  code, _, err = build(capsys, "--manual_dir", str(tmp_path / "m"), "--data_dir", str(data_dir))
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert f"--data_dir '{data_dir}'" in err and "Traceback" not in err
