"""MedICaT: a tiny release in the distributed layout builds with the seed-42 split decided before
images are checked, and every dropped line, text and figure is counted."""
import json
import re

import numpy as np
import pytest

from mpma_jax.data import builders, images
from mpma_jax.data.builders import medicat

_LONG = "Axial CT of the chest shows a nodule."


class SmallMedicat(medicat.Medicat):
  """MedICaT with 4 figures held out (2 validation, 2 test)."""
  HELD_OUT, HELD_FRACTION = 4, 0.5


def _figure(i, caption=_LONG, references=None, radiology=True):
  return {
      "pdf_hash": f"hash{i:02d}", "fig_uri": f"2-Figure{i}-1.png", "fig_key": f"f{i}",
      "s2_caption": caption, "s2orc_caption": caption, "s2orc_references": references,
      "radiology": radiology, "scope": "single", "predicted_type": "radiology",
      "oa_info": {"license": "CC BY"}
  }


# Radiology figures in file order; with seed 42 and 10 of them the permutation is
# [5 6 0 7 3 2 4 9 1 8]: train 5 6 0 7 3 2, validation 4 9, test 1 8.
FIGURES = [
    _figure(0),
    _figure(1, references=["As seen in Figure 1, the nodule is small."]),
    _figure(2),  # image missing
    _figure(3),  # image truncated
    _figure(4, caption="CT.", references=["Figure 4 shows the contrast enhanced scan."]),
    _figure(5, caption=None),  # no text at all
    _figure(6, references=["The lesion (Fig. 6) was resected later.", "Fig. 6"]),
    _figure(7, caption="  Chest\n radiograph\twith   effusion. "),
    _figure(8),
    _figure(9),
]


def _write(manual):
  release = manual / "release"
  (release / "figures").mkdir(parents=True)
  lines = [json.dumps(f) for f in FIGURES[:3]]
  lines += [json.dumps(_figure(90, radiology=False)), "{not json", ""]
  lines += [json.dumps(f) for f in FIGURES[3:]] + [json.dumps(_figure(91, radiology=False))]
  (release /
   "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl").write_text("\n".join(lines) +
                                                                               "\n")
  rng = np.random.default_rng(0)
  for f in FIGURES:
    if f["pdf_hash"] == "hash02":
      continue
    data = images.encode_png(rng.integers(0, 256, (12, 10), dtype=np.uint8))
    if f["pdf_hash"] == "hash03":
      data = data[:len(data) // 2]
    (release / "figures" / f"{f['pdf_hash']}_{f['fig_uri']}").write_bytes(data)


def _ids(b, split):
  source = b.as_data_source(split)
  return {source[i]["id"].decode(): source[i] for i in range(len(source))}


def test_split_counts_and_texts(tmp_path, monkeypatch):
  monkeypatch.setitem(builders.BUILDERS, "small_medicat", SmallMedicat)
  _write(tmp_path / "manual")
  b, report = builders.build("small_medicat", str(tmp_path / "manual"), str(tmp_path / "out"))
  assert report == {
      "train": {
          "written": 3, "skipped": {
              "empty text (one of several texts)": 1, "malformed json line": 1, "missing image": 1,
              "no usable text": 1, "not radiology": 2, "text too short (one of several texts)": 1,
              "unreadable image": 1
          }
      }, "validation": {"written": 2, "skipped": {"text too short (one of several texts)": 1}},
      "test": {"written": 2, "skipped": {}}
  }
  name = lambda i: f"hash{i:02d}_2-Figure{i}-1.png"  # noqa: E731
  train, validation, test = (_ids(b, s) for s in ("train", "validation", "test"))
  # The missing and corrupt figures (2, 3) keep their place in train: nothing else moves.
  assert set(train) == {name(i) for i in (6, 0, 7)}
  assert set(validation) == {name(i) for i in (4, 9)}
  assert set(test) == {name(i) for i in (1, 8)}
  assert train[name(0)]["texts"] == [_LONG.encode()]
  assert train[name(6)]["texts"] == [_LONG.encode(), b"The lesion (Fig. 6) was resected later."]
  assert train[name(7)]["texts"] == [b"Chest radiograph with effusion."]
  # The caption is too short, the reference is kept.
  assert validation[name(4)]["texts"] == [b"Figure 4 shows the contrast enhanced scan."]
  assert test[name(1)]["texts"] == [_LONG.encode(), b"As seen in Figure 1, the nodule is small."]
  expected = (tmp_path / "manual" / "release" / "figures" / name(8)).read_bytes()
  assert test[name(8)]["image"] == expected  # the original encoded bytes
  assert images.decode(test[name(8)]["image"]).shape == (12, 10, 3)


def test_prior_split_constants():
  assert (medicat.Medicat.SEED, medicat.Medicat.HELD_OUT) == (42, 2000)


@pytest.mark.parametrize(
    "missing",
    ["release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl", "release/figures"])
def test_missing_file_is_named(tmp_path, missing):
  _write(tmp_path / "manual")
  path = tmp_path / "manual" / missing
  if path.is_dir():
    for child in path.iterdir():
      child.unlink()
    path.rmdir()
  else:
    path.unlink()
  # The message also lists the whole layout: look for the file named as the one not found.
  with pytest.raises(FileNotFoundError, match=re.escape(f"expected '{missing}' in manual_dir")):
    builders.build("medicat", str(tmp_path / "manual"), str(tmp_path / "out"))


def test_small_copies_hold_out_a_tenth_and_duplicates_count_once(tmp_path):
  """The real builder (HELD_OUT 2000) on 10 figures, one of them listed twice: it holds out 2
  (a tenth, at least one each for validation and test) instead of sending all to validation/test;
  the repeated line is counted as a duplicate before the split, so nothing else moves."""
  _write(tmp_path / "manual")
  jsonl = tmp_path / "manual" / "release" / medicat.JSONL.split("/")[-1]
  jsonl.write_text(jsonl.read_text() + json.dumps(FIGURES[0]) + "\n")
  b, report = builders.build("medicat", str(tmp_path / "manual"), str(tmp_path / "out"))
  assert b.held_out(10) == 2 and b.held_out(200_000) == 2000 and b.held_out(3) == 2
  assert report["train"]["skipped"]["duplicate"] == 1
  assert report["validation"]["written"] + report["test"]["written"] == 2
  # Seed 42 over 10 figures: [5 6 0 7 3 2 4 9 1 8]; 8 train, validation = 1, test = 8.
  assert set(_ids(b, "validation")) == {"hash01_2-Figure1-1.png"}
  assert set(_ids(b, "test")) == {"hash08_2-Figure8-1.png"}
  with pytest.raises(ValueError, match="2 usable radiology figure.*at least 3"):
    b.held_out(2)
