"""`mpma-data`: build prints exactly one JSON line with per-split counts, show prints decoded
examples, and a wrong manual_dir or name is a one-line error with exit status 2."""
import json
import os
import shutil

import pytest

from mpma_jax.cli import data as cli

REAL = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "vqa_rad"))


@pytest.fixture
def small_vqa_rad(tmp_path):
  """A VQA-RAD copy in the distributed layout: 3 images per split with their questions, one of
  the test split's images missing."""
  manual = tmp_path / "manual"
  (manual / "images").mkdir(parents=True)
  for name in ("trainset.json", "testset.json"):
    records = json.load(open(os.path.join(REAL, name)))
    keep = sorted({r["image_name"] for r in records})[:3]
    json.dump([r for r in records if r["image_name"] in keep], open(manual / name, "w"))
    for image in keep:
      shutil.copy(os.path.join(REAL, "images", image), manual / "images" / image)
  os.remove(manual / "images" / keep[0])  # the test split's first image goes missing
  return manual


@pytest.mark.skipif(not os.path.isdir(REAL), reason="../shared/data/vqa_rad not present")
def test_build_prints_one_json_line_and_show_decodes(small_vqa_rad, tmp_path, capsys):
  data_dir = str(tmp_path / "data")
  assert cli.main(["build", "vqa_rad", "--manual_dir",
                   str(small_vqa_rad), "--data_dir", data_dir]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  out = json.loads(lines[0])
  want = {}
  for split, name in (("train", "trainset.json"), ("test", "testset.json")):
    records = json.load(open(small_vqa_rad / name))
    missing = sum(not (small_vqa_rad / "images" / r["image_name"]).exists() for r in records)
    want[split] = {
        "written": len(records) - missing, "skipped": {"missing image": missing} if missing else {}
    }
  assert out["dataset"] == "vqa_rad" and out["splits"] == want
  assert want["test"]["skipped"]["missing image"] > 0
  assert cli.main(
      ["show", "vqa_rad", "--data_dir", data_dir, "--split", "test", "--num", "2", "--size",
       "64"]) == 0
  shown = capsys.readouterr().out.splitlines()
  assert shown[0].startswith(f"vqa_rad [vqa] test: {want['test']['written']} examples")
  assert "skipped when built: {'missing image'" in shown[1]
  assert len(shown) == 4 and all("image=uint8[64, 64, 3]" in l for l in shown[2:])


def test_errors_name_the_problem(tmp_path, capsys):
  assert cli.main(
      ["build", "vqa_rad", "--manual_dir",
       str(tmp_path), "--data_dir",
       str(tmp_path / "d")]) == 2
  err = capsys.readouterr().err
  assert "expected 'trainset.json'" in err and str(tmp_path) in err
  assert cli.main(["build", "vqa-rad", "--manual_dir", str(tmp_path), "--data_dir", "x"]) == 2
  assert "unknown dataset 'vqa-rad'; available:" in capsys.readouterr().err
  assert cli.main(["show", "vqa_rad", "--data_dir", str(tmp_path / "empty")]) == 2
  assert "not built" in capsys.readouterr().err
