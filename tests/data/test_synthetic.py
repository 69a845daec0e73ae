import dataclasses
import pickle
import re

import numpy as np
import pytest

from mpma_jax.data import synthetic
from mpma_jax.data.synthetic import Case, Lesion


def _lesion_masks(case: Case, lesion: Lesion, size: int):
  """(inner, outer) boolean [S, S] masks: the lesion's core and everything beyond its edge."""
  row, col = divmod(synthetic.REGIONS.index(lesion.region), 3)
  cx = synthetic._CELL_CENTER[col] + lesion.dx
  cy = synthetic._CELL_CENTER[row] + lesion.dy
  rad = synthetic._RADIUS[lesion.size] * lesion.scale
  c = (np.arange(size) + 0.5) * 2.0 / size - 1.0
  d = np.hypot(c[None, :] - cx, c[:, None] - cy)  # [S, S]
  return d < 0.7 * rad, d > rad + 2 * (2.0 / size)


def test_sample_case_deterministic_and_split_dependent():
  for i in range(20):
    assert synthetic.sample_case(3, "train", i) == synthetic.sample_case(3, "train", i)
  train = [synthetic.sample_case(0, "train", i) for i in range(50)]
  val = [synthetic.sample_case(0, "validation", i) for i in range(50)]
  test = [synthetic.sample_case(0, "test", i) for i in range(50)]
  assert all(a != b and a != c and b != c for a, b, c in zip(train, val, test))
  assert len({c.description for c in train}) > 35
  assert synthetic.sample_case(1, "train", 0) != train[0]
  with pytest.raises(ValueError, match="split"):
    synthetic.sample_case(0, "valid", 0)


def test_cases_are_well_formed():
  counts = np.zeros(4, int)
  for i in range(500):
    case = synthetic.sample_case(0, "train", i)
    assert case.modality in synthetic.MODALITIES and case.organ in synthetic.ORGANS
    regions = [l.region for l in case.lesions]
    assert len(set(regions)) == len(regions) <= 3
    ranks = [-synthetic.SIZES.index(l.size) for l in case.lesions]
    assert ranks == sorted(ranks)  # largest first
    counts[len(case.lesions)] += 1
  assert counts.min() > 40 and counts[1] + counts[2] > 250  # 1-2 lesions are the common case


def test_combinatorial_diversity():
  cases = [synthetic.sample_case(0, "test", i) for i in range(500)]
  distinct = len({c.description for c in cases})
  print(f"distinct descriptions among 500 test cases: {distinct}")
  assert distinct >= 300
  assert len({(c.modality, c.organ) for c in cases}) == 12


@pytest.mark.parametrize("size", [64, 288])
def test_render_shape_dtype_determinism(size):
  case = synthetic.sample_case(0, "train", 7)
  img = synthetic.render_image(case, size, seed=0, index=7)
  assert img.shape == (size, size, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[..., 0], img[..., 1])
  np.testing.assert_array_equal(img[..., 0], img[..., 2])
  np.testing.assert_array_equal(img, synthetic.render_image(case, size, seed=0, index=7))
  assert not np.array_equal(img, synthetic.render_image(case, size, seed=0, index=8))  # noise
  assert img.std() > 20  # not blank


def test_render_differs_across_indices_and_modalities():
  imgs = [
      synthetic.render_image(synthetic.sample_case(0, "train", i), 64, index=i) for i in range(10)
  ]
  assert len({im.tobytes() for im in imgs}) == 10
  lesions = (Lesion("center", "medium", "bright"),)
  by_modality = {
      m: synthetic.render_image(Case(m, "chest", lesions), 64).astype(float)
      for m in synthetic.MODALITIES
  }
  for a in synthetic.MODALITIES:
    for b in synthetic.MODALITIES:
      if a < b:
        assert np.abs(by_modality[a] - by_modality[b]).mean() > 10, (a, b)


@pytest.mark.parametrize("modality", synthetic.MODALITIES)
@pytest.mark.parametrize("organ", synthetic.ORGANS)
def test_lesions_visible_where_described(modality, organ):
  size = 64
  for k, region in enumerate(synthetic.REGIONS):
    level = {}
    for intensity in synthetic.INTENSITIES:
      lesion = Lesion(region, synthetic.SIZES[k % 3], intensity, dx=0.03, dy=-0.02, scale=1.05)
      case = Case(modality, organ, (lesion,), body_scale=0.97, contrast=1.05)
      with_l = synthetic.render_image(case, size, seed=1, index=k)[..., 0].astype(float)
      without = synthetic.render_image(dataclasses.replace(case, lesions=()), size, seed=1,
                                       index=k)[..., 0].astype(float)
      inner, outer = _lesion_masks(case, lesion, size)
      diff = np.abs(with_l - without)
      assert diff[inner].mean() > 40, (region, intensity)  # clearly visible
      assert diff[outer].max() == 0, (region, intensity)  # and only there
      level[intensity] = (with_l[inner].mean(), without[inner].mean())
    assert level["bright"][0] > level["bright"][1] + 40
    assert level["dark"][0] < level["dark"][1] - 25


def test_render_scales_with_size():
  lesion = Lesion("upper right", "large", "dark")
  case = Case("CT", "abdomen", (lesion,))
  centroids, areas = [], []
  for size in (64, 288):
    diff = np.abs(
        synthetic.render_image(case, size).astype(float) -
        synthetic.render_image(Case("CT", "abdomen", ()), size).astype(float))[..., 0]
    ys, xs = np.nonzero(diff > 30)
    centroids.append(((xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size))
    areas.append(len(xs) / size**2)
  np.testing.assert_allclose(centroids[0], centroids[1], atol=0.02)
  np.testing.assert_allclose(centroids[0], (0.75, 0.25), atol=0.03)  # upper right cell centre
  np.testing.assert_allclose(areas[0], areas[1], rtol=0.15)
  plain = synthetic.render_image(Case("CT", "abdomen", ()), 128).astype(float)
  changed = [(np.abs(
      synthetic.render_image(Case("CT", "abdomen", (Lesion("upper right", s, "dark"),)), 128) -
      plain) > 30).sum() for s in synthetic.SIZES]
  assert changed[0] * 2 < changed[1] and changed[1] * 1.5 < changed[2]  # sizes clearly differ


def test_report_states_what_is_visible():
  rng = np.random.default_rng(0)
  reports = set()
  for i in range(300):
    case = synthetic.sample_case(0, "validation", i)
    text = synthetic.write_report(case, rng)
    reports.add(text)
    assert re.fullmatch(r"[a-z .,:()\-]+", text), text  # plain lowercase words and punctuation
    assert len(text.split()) <= 45
    assert case.modality.lower() in text and case.organ in text
    n = len(case.lesions)
    if n == 0:
      assert "no focal abnormality" in text
    else:
      assert f"{synthetic._NUMBER[n]} {'lesion' if n == 1 else 'lesions'}" in text
    for lesion in case.lesions:
      assert lesion.region in text and lesion.size in text and lesion.intensity in text
    for region in set(synthetic.REGIONS) - {l.region for l in case.lesions}:
      assert f"the {region}" not in text
  assert len(reports) > 250
  case = synthetic.sample_case(0, "train", 1)
  a = synthetic.write_report(case, np.random.default_rng(5))
  assert a == synthetic.write_report(case, np.random.default_rng(5))
  assert len({synthetic.write_report(case, np.random.default_rng(s)) for s in range(20)}) > 5


def test_questions_consistent_with_case():
  answers = []
  for i in range(300):
    case = synthetic.sample_case(0, "train", i)
    qs = synthetic.questions(case)
    assert qs == synthetic.questions(case)
    regions = {l.region for l in case.lesions}
    for q in qs:
      assert set(q) == {"question", "answer", "answer_type", "question_type"}
      assert q["answer_type"] in ("CLOSED", "OPEN")
      if q["answer_type"] == "CLOSED":
        assert q["answer"] in ("yes", "no")
        answers.append(q["answer"])
      question = q["question"]
      if question == "how many lesions are there?":
        assert int(q["answer"]) == len(case.lesions)
      elif question == "what imaging modality is this?":
        assert q["answer"] == case.modality.lower()
      elif question == "which organ is shown?":
        assert q["answer"] == case.organ
      elif question in ("where is the lesion?", "where is the largest lesion?"):
        assert q["answer"] == case.lesions[0].region
      elif question.startswith("is there a lesion in the "):
        region = question[len("is there a lesion in the "):-1]
        assert q["answer"] == ("yes" if region in regions else "no")
      elif question.startswith("what size is the lesion in the "):
        region = question[len("what size is the lesion in the "):-1]
        assert q["answer"] == next(l.size for l in case.lesions if l.region == region)
      elif question == "is there a focal abnormality?":
        assert q["answer"] == ("yes" if case.lesions else "no")
      elif question.endswith(" image?"):
        asked = question.split()[3]  # "is this a(n) <modality> image?"
        assert q["answer"] == ("yes" if asked == case.modality.lower() else "no")
  assert 0.4 < np.mean([a == "yes" for a in answers]) < 0.6


def test_source_grain_protocol():
  src = synthetic.SyntheticSource("validation", num_examples=30, image_size=64, seed=2)
  assert len(src) == 30
  ex = src[np.int64(4)]
  assert set(ex) == {"index", "image", "report", "modality", "organ", "num_lesions"}
  assert ex["index"] == 4 and ex["index"].dtype == np.int64
  assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
  case = synthetic.sample_case(2, "validation", 4)
  assert (ex["modality"], ex["organ"], ex["num_lesions"]) == (case.modality, case.organ,
                                                              len(case.lesions))
  np.testing.assert_array_equal(ex["image"], synthetic.render_image(case, 64, seed=2, index=4))
  assert ex["report"] == synthetic.report(2, "validation", 4)
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[4]["image"], ex["image"])
  assert clone[4]["report"] == ex["report"]
  for bad in (-1, 30):
    with pytest.raises(IndexError):
      src[bad]
  assert list(synthetic.report_corpus(30, seed=2,
                                      split="validation")) == [src[i]["report"] for i in range(30)]


def test_source_in_grain_dataset():
  grain = pytest.importorskip("grain")
  src = synthetic.SyntheticSource("train", num_examples=16, image_size=32)
  ds = grain.MapDataset.source(src).map(lambda ex: ex["image"].mean())
  assert len(ds) == 16 and np.isclose(ds[3], src[3]["image"].mean())


def test_qa_pairs_index_images():
  pairs = list(synthetic.qa_pairs("test", 20, seed=0))
  assert {p["index"] for p in pairs} == set(range(20))
  for p in pairs:
    assert p in [{"index": p["index"], **q}
                 for q in synthetic.questions(synthetic.sample_case(0, "test", p["index"]))]
  assert len(pairs) >= 20 * 9
