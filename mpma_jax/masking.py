"""Paired masking (docs/method.md §4): one MAE image mask and one BERT-style text mask per example.

Pure NumPy: it runs inside the data-loader worker processes, not under `jit`. Every random draw
for an example comes from `example_rng(seed, epoch, index)`, so an example's masks depend only on
those three numbers (not on worker count, prefetch order or process), and a restarted run sees
exactly the same masks. Image masks are index arrays of a fixed length (static shapes, §7).
"""
import numpy as np

IGNORE = -100  # label at positions the MLM loss skips (losses.mlm_loss)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The only source of randomness for one example's masks."""
  return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def num_kept_patches(num_patches: int, mask_ratio: float) -> int:
  """Static number of visible patches: int(N * (1 - ratio)), at least 1."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"image mask_ratio must be in [0, 1), got {mask_ratio}")
  if num_patches < 1:
    raise ValueError(f"num_patches must be >= 1, got {num_patches}")
  return max(1, int(num_patches * (1.0 - mask_ratio)))


def image_mask(rng: np.random.Generator, num_patches: int,
               mask_ratio: float) -> tuple[np.ndarray, np.ndarray]:
  """MAE random masking -> (keep int32 [n_keep], restore int32 [N]).

  keep lists the visible patches; restore[j] is patch j's position in the shuffled order, so patch
  j is masked iff restore[j] >= n_keep, and restore[keep] == arange(n_keep).
  """
  n_keep = num_kept_patches(num_patches, mask_ratio)
  noise = rng.random(num_patches)  # [N]
  ids_shuffle = np.argsort(noise, kind="stable")  # [N]
  ids_restore = np.argsort(ids_shuffle, kind="stable")  # [N], the inverse permutation
  return ids_shuffle[:n_keep].astype(np.int32), ids_restore.astype(np.int32)


def mlm_mask(rng: np.random.Generator, input_ids: np.ndarray, candidate_mask: np.ndarray, *,
             mask_ratio: float, mask_id: int, random_ids: np.ndarray, mask_prob: float = 0.8,
             random_prob: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """BERT masking of real words -> (masked ids int32 [L], labels int32 [L]).

  Exactly max(1, round(ratio * n_candidates)) candidates are chosen (none if there are none); each
  becomes mask_id with prob mask_prob, a draw from random_ids with prob random_prob, else stays.
  labels hold the original id at chosen positions and IGNORE elsewhere.
  """
  input_ids = np.asarray(input_ids)
  candidate_mask = np.asarray(candidate_mask, dtype=bool)
  if input_ids.ndim != 1 or candidate_mask.shape != input_ids.shape:
    raise ValueError(f"input_ids and candidate_mask must both be [L]; got {input_ids.shape} "
                     f"and {candidate_mask.shape}")
  if not 0.0 <= mask_ratio <= 1.0:
    raise ValueError(f"text mask_ratio must be in [0, 1], got {mask_ratio}")
  if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1.0:
    raise ValueError(f"need mask_prob, random_prob >= 0 with sum <= 1; got {mask_prob}, "
                     f"{random_prob}")
  random_ids = np.asarray(random_ids)
  if random_prob > 0 and random_ids.size == 0:
    raise ValueError("random_ids is empty but random_prob > 0")

  masked = input_ids.astype(np.int32)  # a copy
  labels = np.full(input_ids.shape, IGNORE, np.int32)  # [L]
  candidates = np.flatnonzero(candidate_mask)  # [n_candidates]
  if candidates.size == 0:
    return masked, labels
  n = min(candidates.size, max(1, int(round(mask_ratio * candidates.size))))
  chosen = rng.choice(candidates, size=n, replace=False)  # [n]
  labels[chosen] = input_ids[chosen]

  # Always draw both arrays, so the number of draws (and later draws) never depends on the outcome.
  u = rng.random(n)  # [n]
  if random_ids.size:
    replacements = random_ids[rng.integers(0, random_ids.size, size=n)]  # [n]
  else:  # only allowed when random_prob == 0, so these are never used
    replacements = np.full(n, mask_id)
  to_mask = u < mask_prob
  to_random = (u >= mask_prob) & (u < mask_prob + random_prob)
  masked[chosen[to_mask]] = mask_id
  masked[chosen[to_random]] = replacements[to_random]
  return masked, labels


def paired_masks(seed: int, epoch: int, index: int, *, num_patches: int, image_mask_ratio: float,
                 input_ids: np.ndarray, candidate_mask: np.ndarray, text_mask_ratio: float,
                 mask_id: int, random_ids: np.ndarray, mask_prob: float = 0.8,
                 random_prob: float = 0.1) -> dict:
  """Both masks of one example from one rng (image first, then text).

  Returns {"image_keep": int32 [n_keep], "image_restore": int32 [N], "mlm_ids": int32 [L],
  "mlm_labels": int32 [L]}.
  """
  rng = example_rng(seed, epoch, index)
  keep, restore = image_mask(rng, num_patches, image_mask_ratio)
  mlm_ids, mlm_labels = mlm_mask(rng, input_ids, candidate_mask, mask_ratio=text_mask_ratio,
                                 mask_id=mask_id, random_ids=random_ids, mask_prob=mask_prob,
                                 random_prob=random_prob)
  return {
      "image_keep": keep, "image_restore": restore, "mlm_ids": mlm_ids, "mlm_labels": mlm_labels
  }
