"""Paired masking: static counts, consistent permutations, determinism and the 80/10/10 split."""
import numpy as np
import pytest

from mpma_jax import losses, masking

MASK_ID = 4
SPECIAL = (0, 1, 2, MASK_ID)  # <s>, <pad>, </s>, <mask>
RANDOM_IDS = np.arange(10, 60, dtype=np.int32)  # the allowed non-special vocabulary


def _text(n_words=20, length=32):
  """ids [L] = <s> words </s> <pad>...; candidates [L] = the words only."""
  ids = np.full(length, 1, np.int32)
  ids[0], ids[n_words + 1] = 0, 2
  ids[1:n_words + 1] = 100 + np.arange(n_words)  # outside RANDOM_IDS, so replacements are visible
  cand = np.zeros(length, bool)
  cand[1:n_words + 1] = True
  return ids, cand


def _paired(seed=0, epoch=0, index=0, **kw):
  ids, cand = _text()
  args = dict(num_patches=324, image_mask_ratio=0.75, input_ids=ids, candidate_mask=cand,
              text_mask_ratio=0.15, mask_id=MASK_ID, random_ids=RANDOM_IDS)
  args.update(kw)
  return masking.paired_masks(seed, epoch, index, **args)


def test_num_kept_patches():
  assert masking.num_kept_patches(324, 0.75) == 81
  assert masking.num_kept_patches(196, 0.75) == 49
  assert masking.num_kept_patches(10, 0.0) == 10
  assert masking.num_kept_patches(3, 0.99) == 1  # never zero visible patches
  for bad in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="mask_ratio"):
      masking.num_kept_patches(324, bad)


@pytest.mark.parametrize("n,ratio", [(324, 0.75), (196, 0.75), (50, 0.5), (7, 0.9)])
def test_image_mask_is_a_consistent_permutation(n, ratio):
  n_keep = masking.num_kept_patches(n, ratio)
  for seed in range(20):
    keep, restore = masking.image_mask(masking.example_rng(seed, 0, 0), n, ratio)
    assert keep.dtype == np.int32 and restore.dtype == np.int32
    assert keep.shape == (n_keep,) and restore.shape == (n,)
    np.testing.assert_array_equal(np.sort(restore), np.arange(n))  # a permutation
    assert len(set(keep.tolist())) == n_keep
    np.testing.assert_array_equal(restore[keep], np.arange(n_keep))
    visible = restore < n_keep
    assert visible.sum() == n_keep
    np.testing.assert_array_equal(np.sort(keep), np.flatnonzero(visible))
    # restore undoes the shuffle: ids_shuffle[restore] == arange(N).
    ids_shuffle = np.argsort(restore)
    np.testing.assert_array_equal(ids_shuffle[:n_keep], keep)
    np.testing.assert_array_equal(np.take(ids_shuffle, restore), np.arange(n))


def test_image_mask_is_uniform_over_patches():
  n, draws = 16, 4000
  counts = np.zeros(n)
  for i in range(draws):
    keep, _ = masking.image_mask(masking.example_rng(1, 0, i), n, 0.75)
    counts[keep] += 1
  np.testing.assert_allclose(counts / draws, 0.25, atol=0.04)


def test_determinism():
  a, b = _paired(3, 1, 7), _paired(3, 1, 7)
  assert set(a) == {"image_keep", "image_restore", "mlm_ids", "mlm_labels"}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  for other in (_paired(3, 2, 7), _paired(3, 1, 8), _paired(4, 1, 7)):
    assert not np.array_equal(a["image_restore"], other["image_restore"])
  # Text masks also change with the epoch (checked over several examples: a single one may collide).
  same = [
      np.array_equal(_paired(0, 0, i)["mlm_labels"],
                     _paired(0, 1, i)["mlm_labels"]) for i in range(10)
  ]
  assert not all(same)


def test_paired_shapes_and_dtypes():
  out = _paired()
  assert out["image_keep"].shape == (81,) and out["image_restore"].shape == (324,)
  assert out["mlm_ids"].shape == (32,) and out["mlm_labels"].shape == (32,)
  assert all(v.dtype == np.int32 for v in out.values())


@pytest.mark.parametrize("n_words,ratio,expected", [(20, 0.15, 3), (3, 0.15, 1), (10, 0.15, 2),
                                                    (40, 0.5, 20), (5, 1.0, 5)])
def test_mlm_chooses_exactly_n(n_words, ratio, expected):
  ids, cand = _text(n_words, length=48)
  for seed in range(30):
    masked, labels = masking.mlm_mask(masking.example_rng(seed, 0, 0), ids, cand, mask_ratio=ratio,
                                      mask_id=MASK_ID, random_ids=RANDOM_IDS)
    chosen = labels != masking.IGNORE
    assert chosen.sum() == expected
    assert cand[chosen].all()  # special tokens and padding never chosen
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])  # the rest is untouched


def test_mlm_never_chooses_special_or_padding():
  ids, cand = _text(12, length=32)
  hits = np.zeros(32, int)
  for seed in range(500):
    _, labels = masking.mlm_mask(masking.example_rng(seed, 0, 0), ids, cand, mask_ratio=0.15,
                                 mask_id=MASK_ID, random_ids=RANDOM_IDS)
    hits += labels != masking.IGNORE
  assert hits[~cand].sum() == 0
  assert (hits[cand] > 0).all()  # every real word gets chosen sometimes


def test_mlm_80_10_10_split():
  ids, cand = _text(20)
  n_mask = n_random = n_same = 0
  for i in range(3000):
    masked, labels = masking.mlm_mask(masking.example_rng(0, 0, i), ids, cand, mask_ratio=0.15,
                                      mask_id=MASK_ID, random_ids=RANDOM_IDS)
    chosen = labels != masking.IGNORE
    new = masked[chosen]
    n_mask += np.sum(new == MASK_ID)
    is_random = (new != MASK_ID) & (new != ids[chosen])
    assert np.isin(new[is_random], RANDOM_IDS).all()  # replacements from the allowed vocabulary
    n_random += np.sum(is_random)
    n_same += np.sum(new == ids[chosen])
  total = n_mask + n_random + n_same
  assert total == 3000 * 3
  assert abs(n_mask / total - 0.8) < 0.02
  assert abs(n_random / total - 0.1) < 0.015
  assert abs(n_same / total - 0.1) < 0.015


def test_mlm_custom_probabilities():
  ids, cand = _text(20)
  masked, labels = masking.mlm_mask(masking.example_rng(0, 0, 0), ids, cand, mask_ratio=1.0,
                                    mask_id=MASK_ID, random_ids=RANDOM_IDS, mask_prob=1.0,
                                    random_prob=0.0)
  np.testing.assert_array_equal(masked[cand], MASK_ID)
  masked, _ = masking.mlm_mask(masking.example_rng(0, 0,
                                                   0), ids, cand, mask_ratio=1.0, mask_id=MASK_ID,
                               random_ids=RANDOM_IDS, mask_prob=0.0, random_prob=1.0)
  assert np.isin(masked[cand], RANDOM_IDS).all()


def test_mlm_without_candidates_chooses_nothing():
  ids, _ = _text(5)
  masked, labels = masking.mlm_mask(masking.example_rng(0, 0, 0), ids, np.zeros_like(ids, bool),
                                    mask_ratio=0.15, mask_id=MASK_ID, random_ids=RANDOM_IDS)
  np.testing.assert_array_equal(masked, ids)
  np.testing.assert_array_equal(labels, masking.IGNORE)
  assert masked.dtype == np.int32 and labels.dtype == np.int32


def test_mlm_rejects_bad_arguments():
  ids, cand = _text(5)
  rng = masking.example_rng(0, 0, 0)
  with pytest.raises(ValueError, match="candidate_mask"):
    masking.mlm_mask(rng, ids, cand[:-1], mask_ratio=0.15, mask_id=MASK_ID, random_ids=RANDOM_IDS)
  with pytest.raises(ValueError, match="mask_prob"):
    masking.mlm_mask(rng, ids, cand, mask_ratio=0.15, mask_id=MASK_ID, random_ids=RANDOM_IDS,
                     mask_prob=0.8, random_prob=0.3)


def test_ignore_matches_losses():
  assert masking.IGNORE == losses.IGNORE
