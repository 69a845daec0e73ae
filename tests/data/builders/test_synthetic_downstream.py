"""The built-in downstream sets (synthetic_vqa, synthetic_cls, synthetic_chest) built tiny."""
import collections
import dataclasses
import re

import numpy as np
import pytest

from mpma_jax.cli import data as cli
from mpma_jax.data import builders, images, synthetic
from mpma_jax.data.builders import synthetic_downstream as sd

SIZE, NUM, NUM_EVAL, SEED = 32, 12, 4, 3
SPLITS = {"train": NUM, "validation": NUM_EVAL, "test": NUM_EVAL}


def _all(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def _index(example_id: bytes) -> int:
  return int(example_id.decode().split("-")[1])  # "{split}-{index}[-{question}]"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic_downstream"))
  out = {}
  for name, make in (("vqa", sd.make_vqa), ("cls", sd.make_cls), ("chest", sd.make_chest)):
    b = make(root, NUM, SIZE, SEED, num_eval=NUM_EVAL)
    b.download_and_prepare()
    out[name] = b
  return out


def test_synthetic_vqa(built):
  b = built["vqa"]
  assert b.info.metadata["task"] == "vqa"
  for split, num in SPLITS.items():
    examples = _all(b, split)
    cases = [synthetic.sample_case(SEED, split, i) for i in range(num)]
    assert len(examples) == sum(len(synthetic.questions(c)) for c in cases)
    assert set(examples[0]) == {
        "id", "image_id", "image", "question", "answer", "answer_type", "category"
    }
    by_image = collections.defaultdict(list)
    for ex in examples:
      by_image[ex["image_id"]].append(ex)
    assert sorted(by_image) == sorted(f"{split}-{i}".encode() for i in range(num))
    for image_id, group in by_image.items():
      i = _index(image_id)
      assert len({ex["image"] for ex in group}) == 1  # the questions share the image bytes
      expected = images.encode_png(synthetic.render_image(cases[i], SIZE, seed=SEED, index=i))
      assert group[0]["image"] == expected
      got = sorted((int(ex["id"].decode().rsplit("-", 1)[1]), ex["question"].decode(),
                    ex["answer"].decode(), ex["answer_type"].decode(), ex["category"].decode())
                   for ex in group)
      assert got == [(j, q["question"], q["answer"], q["answer_type"].lower(),
                      q["question_type"].lower())
                     for j, q in enumerate(synthetic.questions(cases[i]))]
  types = {ex["answer_type"] for ex in _all(b, "train")}
  assert types == {b"open", b"closed"}


_MODALITY_WORDS = {"ct", "mri", "x-ray", "xray", "ultrasound", "us", "mr"} | set(
    synthetic._TECH_TERM.values())  # pylint: disable=protected-access


def test_synthetic_cls(built):
  b = built["cls"]
  assert b.info.metadata["class_names"] == list(synthetic.MODALITIES)
  for split, num in SPLITS.items():
    examples = _all(b, split)
    assert len(examples) == num
    for ex in examples:
      i = _index(ex["id"])
      case = synthetic.sample_case(SEED, split, i)
      label = synthetic.MODALITIES.index(case.modality)
      assert ex["label"] == label
      np.testing.assert_array_equal(ex["labels"], np.eye(4)[label])
      assert ex["text"].decode() == sd.caption(case)
      img = images.decode(ex["image"])
      np.testing.assert_array_equal(img, synthetic.render_image(case, SIZE, seed=SEED, index=i))
  # No caption names or hints at the modality, over many cases.
  for i in range(300):
    text = sd.caption(synthetic.sample_case(0, "train", i))
    assert not set(re.findall(r"[a-z-]+", text)) & _MODALITY_WORDS, text


def test_caption_hand_written():
  lesions = (synthetic.Lesion("center", "large",
                              "dark"), synthetic.Lesion("upper left", "small", "bright"))
  assert sd.caption(synthetic.Case("MRI", "head", lesions)) == (
      "image of the head. two lesions: a large dark lesion in the center and a small bright "
      "lesion in the upper left.")
  assert sd.caption(synthetic.Case("CT", "chest",
                                   ())) == "image of the chest. no focal abnormality."


def test_synthetic_chest(built):
  b = built["chest"]
  assert b.info.metadata["class_names"] == [
      "lesion", "large lesion", "bright lesion", "multiple lesions"
  ]
  for split, num in SPLITS.items():
    examples = _all(b, split)
    assert len(examples) == num
    for ex in examples:
      i = _index(ex["id"])
      case = synthetic.sample_case(SEED, split, i)
      assert ex["label"] == -1 and ex["text"] == b""
      np.testing.assert_array_equal(ex["labels"], sd.chest_labels(case))
      img = images.decode(ex["image"])
      chest = sd.chest_case(case)
      assert (chest.modality, chest.organ, chest.lesions) == ("X-ray", "chest", case.lesions)
      np.testing.assert_array_equal(img, synthetic.render_image(chest, SIZE, seed=SEED, index=i))
      # The findings are in the pixels: without lesions the picture is different iff any exist.
      bare = synthetic.render_image(sd.chest_case(dataclasses.replace(case, lesions=())), SIZE,
                                    seed=SEED, index=i)
      assert (not np.array_equal(img, bare)) == bool(ex["labels"][0])


def test_chest_labels_hand_written():
  big_dark = synthetic.Lesion("center", "large", "dark")
  small_bright = synthetic.Lesion("upper left", "small", "bright")
  case = synthetic.Case("CT", "head", ())
  assert sd.chest_labels(case).tolist() == [0, 0, 0, 0]
  assert sd.chest_labels(synthetic.Case("CT", "head", (big_dark,))).tolist() == [1, 1, 0, 0]
  assert sd.chest_labels(synthetic.Case("CT", "head", (small_bright,))).tolist() == [1, 0, 1, 0]
  both = synthetic.Case("CT", "head", (big_dark, small_bright))
  assert sd.chest_labels(both).tolist() == [1, 1, 1, 1]


def test_configs_and_reuse(tmp_path, built):
  assert built["vqa"].builder_config.name == f"n{NUM}_e{NUM_EVAL}_s{SIZE}_seed{SEED}"
  assert sd.make_cls(str(tmp_path), 5, 16).builder_config.name == "n5_e5_s16_seed0"
  for name in ("synthetic_vqa", "synthetic_cls", "synthetic_chest"):  # the default config
    assert builders.builder(name, str(tmp_path)).builder_config.name == "n1000_e200_s64_seed0"
  again = sd.make_vqa(
      str(built["vqa"].data_dir).split("/synthetic_vqa/")[0], NUM, SIZE, SEED, num_eval=NUM_EVAL)
  assert again.is_prepared()
  with pytest.raises(ValueError, match="num_eval"):
    sd.make_chest(str(tmp_path), 3, 16, num_eval=0)
  # builders.build (what `mpma-data build` calls) needs no manual_dir and reports no skips.
  _, report = builders.build("synthetic_chest", "", str(tmp_path / "b"),
                             config=sd.config_for(2, 1, 16, 0))
  assert report == {
      "train": {"written": 2, "skipped": {}}, "validation": {"written": 1, "skipped": {}},
      "test": {"written": 1, "skipped": {}}
  }


def test_mpma_data_list(capsys):
  assert cli.main(["list"]) == 0
  lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
  assert lines["synthetic_vqa"] == "vqa"
  assert lines["synthetic_cls"] == "classification"
  assert lines["synthetic_chest"] == "classification"
