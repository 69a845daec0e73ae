"""Losses against hand computations: MIM on masked patches only, MLM on chosen positions, InfoNCE,
and retrieval recall with ties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpma_jax import losses, masking, retrieval
from tests.conftest import tiny_config


def _lse(x, axis=-1):
  m = np.max(x, axis=axis, keepdims=True)
  return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def _restore_batch(b, n, ratio, seed=0):
  return np.stack([
      masking.image_mask(masking.example_rng(seed, 0, i), n, ratio)[1] for i in range(b)
  ])  # [B, N]


# --- patchify ----------------------------------------------------------------------------------
def test_patchify_hand_checked():
  img = np.arange(4 * 4 * 2, dtype=np.float32).reshape(1, 4, 4, 2)  # [B, H, W, C]
  p = losses.patchify(jnp.asarray(img), 2)
  assert p.shape == (1, 4, 8)
  # Patch 1 = rows 0-1, columns 2-3 (row-major grid); inside: (row, col, channel).
  expected = np.array([
      img[0, 0, 2, 0], img[0, 0, 2, 1], img[0, 0, 3, 0], img[0, 0, 3, 1], img[0, 1, 2, 0],
      img[0, 1, 2, 1], img[0, 1, 3, 0], img[0, 1, 3, 1]
  ])
  np.testing.assert_array_equal(p[0, 1], expected)
  np.testing.assert_array_equal(p[0, 2], img[0, 2:4, 0:2].reshape(-1))  # second grid row


def test_patchify_round_trip():
  img = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  p = losses.patchify(img, 8)
  assert p.shape == (2, 16, 192)
  np.testing.assert_array_equal(losses.unpatchify(p, 8, 3), img)


def test_patchify_rejects_indivisible():
  with pytest.raises(ValueError, match="divisible"):
    losses.patchify(jnp.zeros((1, 30, 32, 3)), 8)
  with pytest.raises(ValueError, match="square"):
    losses.unpatchify(jnp.zeros((1, 6, 12)), 2)


# --- MIM ---------------------------------------------------------------------------------------
def test_mim_ignores_visible_patches():
  b, n, patch = 2, 16, 4
  n_keep = masking.num_kept_patches(n, 0.75)
  restore = jnp.asarray(_restore_batch(b, n, 0.75))
  images = jax.random.uniform(jax.random.key(1), (b, 16, 16, 3))
  pred = jax.random.normal(jax.random.key(2), (b, n, patch * patch * 3))
  visible = (restore < n_keep)[..., None]
  pred2 = jnp.where(visible, pred + 100.0, pred)  # change only the visible predictions

  loss = losses.mim_loss(pred, images, restore, n_keep, patch)
  np.testing.assert_allclose(losses.mim_loss(pred2, images, restore, n_keep, patch), loss,
                             rtol=1e-6)
  grad = jax.grad(losses.mim_loss)(pred, images, restore, n_keep, patch)
  np.testing.assert_array_equal(jnp.where(visible, grad, 0.0), 0.0)
  assert jnp.abs(jnp.where(visible, 0.0, grad)).sum() > 0  # masked patches do get gradient
  # Changing a masked prediction does change the loss.
  pred3 = jnp.where(visible, pred, pred + 1.0)
  assert losses.mim_loss(pred3, images, restore, n_keep, patch) != loss


def test_mim_without_norm_pix_is_hand_computation():
  b, n, patch = 2, 4, 2
  rng = np.random.default_rng(0)
  images = rng.normal(size=(b, 4, 4, 3)).astype(np.float32)
  pred = rng.normal(size=(b, n, 12)).astype(np.float32)
  restore = np.array([[0, 3, 1, 2], [2, 0, 3, 1]])  # n_keep = 2: masked = restore >= 2
  target = np.stack(
      [images[:, 0:2, 0:2], images[:, 0:2, 2:4], images[:, 2:4, 0:2], images[:, 2:4, 2:4]],
      axis=1).reshape(b, n, 12)
  masked = [(0, 1), (0, 3), (1, 0), (1, 2)]
  expected = np.mean([np.mean((pred[i, j] - target[i, j])**2) for i, j in masked])
  got = losses.mim_loss(jnp.asarray(pred), jnp.asarray(images), jnp.asarray(restore), 2, patch,
                        norm_pix=False)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_mim_norm_pix_target():
  images = np.random.default_rng(1).normal(3.0, 2.0, size=(1, 4, 4, 3)).astype(np.float32)
  target = np.asarray(losses.patchify(jnp.asarray(images), 2))  # [1, 4, 12]
  normed = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  restore = np.arange(4)[None]  # n_keep = 1: patches 1, 2, 3 masked
  # Predicting the normalised target exactly gives zero loss; predicting raw pixels does not.
  assert losses.mim_loss(jnp.asarray(normed), images, restore, 1, 2) < 1e-10
  assert losses.mim_loss(jnp.asarray(target), images, restore, 1, 2) > 1.0


def test_mim_norm_pix_unbiased_variance():
  """unbiased_var (model.mim.target_var_unbiased) divides by the sample standard deviation, as
  MAE's and M3AE's torch.var; the default by the population one."""
  images = np.random.default_rng(2).normal(3.0, 2.0, size=(2, 4, 4, 3)).astype(np.float32)
  target = np.asarray(losses.patchify(jnp.asarray(images), 2))  # [2, 4, 12]
  centred = target - target.mean(-1, keepdims=True)
  restore = np.tile(np.arange(4), (2, 1))  # n_keep = 1: patches 1, 2, 3 masked
  for ddof, unbiased in ((1, True), (0, False)):
    normed = centred / np.sqrt(target.var(-1, ddof=ddof, keepdims=True) + 1e-6)
    assert losses.mim_loss(jnp.asarray(normed), images, restore, 1, 2,
                           unbiased_var=unbiased) < 1e-10
  sample = centred / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
  assert losses.mim_loss(jnp.asarray(sample), images, restore, 1, 2) > 1e-5  # the default differs
  # compute_losses reads the field.
  config = tiny_config()
  config.model.image.update(size=4, patch=2)
  config.loss.update(mlm=0.0, global_=0.0, local=0.0, itm=0.0)
  batch = {
      "image": (images * 10 + 100).clip(0, 255).astype(np.uint8), "image_restore": restore,
      "image_keep": np.zeros((2, 1), np.int32)
  }
  pixels = np.asarray(losses.normalize_images(batch["image"]))
  pixels = np.asarray(losses.patchify(jnp.asarray(pixels), 2))
  centred = pixels - pixels.mean(-1, keepdims=True)
  pred = centred / np.sqrt(pixels.var(-1, ddof=1, keepdims=True) + 1e-6)  # [2, 4, 12]
  out = {"mim_pred": jnp.asarray(pred), "temperature_global": 1.0, "temperature_local": 1.0}
  for unbiased in (True, False):
    config.model.mim.target_var_unbiased = unbiased
    loss = losses.compute_losses(out, batch, config)[1]["mim"]
    assert (loss < 1e-10) == unbiased, (unbiased, loss)


# --- MLM / ITM ---------------------------------------------------------------------------------
def test_mlm_loss_hand_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  labels = np.full((2, 5), losses.IGNORE)
  labels[0, 1], labels[0, 3], labels[1, 4] = 2, 6, 0
  chosen = [(0, 1), (0, 3), (1, 4)]
  ce = [_lse(logits[i, j]) - logits[i, j, labels[i, j]] for i, j in chosen]
  acc = np.mean([np.argmax(logits[i, j]) == labels[i, j] for i, j in chosen])
  loss, accuracy = losses.mlm_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(loss, np.mean(ce), rtol=1e-5)
  np.testing.assert_allclose(accuracy, acc)

  # Positions that are not chosen never matter.
  other = logits.copy()
  other[0, 0] += 50.0
  other[1, :4] = rng.normal(size=(4, 7)) * 10
  np.testing.assert_allclose(
      losses.mlm_loss(jnp.asarray(other), jnp.asarray(labels))[0], loss, rtol=1e-6)


def test_mlm_loss_without_chosen_positions_is_zero():
  logits = jnp.ones((2, 3, 5))
  labels = jnp.full((2, 3), losses.IGNORE)
  loss, acc = losses.mlm_loss(logits, labels)
  assert float(loss) == 0.0 and float(acc) == 0.0
  grad = jax.grad(lambda x: losses.mlm_loss(x, labels)[0])(logits)
  assert jnp.isfinite(grad).all()


def test_mlm_accuracy():
  logits = jnp.asarray([[[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
  loss, acc = losses.mlm_loss(logits, jnp.asarray([[1, 2, losses.IGNORE]]))
  np.testing.assert_allclose(acc, 0.5)


def test_itm_loss():
  logits = np.array([[2.0, -1.0], [0.5, 1.5], [0.0, 3.0]], np.float32)
  labels = np.array([0, 0, 1])
  ce = [_lse(logits[i]) - logits[i, labels[i]] for i in range(3)]
  loss, acc = losses.itm_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(loss, np.mean(ce), rtol=1e-6)
  np.testing.assert_allclose(acc, 2 / 3, rtol=1e-6)


# --- contrastive -------------------------------------------------------------------------------
def test_info_nce_hand_computation():
  logits = np.array([[2.0, 0.5, -1.0], [0.3, 1.0, 0.2], [-0.5, 2.5, 0.1]], np.float32)
  expected = np.mean([_lse(logits[i]) - logits[i, i] for i in range(3)])
  np.testing.assert_allclose(losses.info_nce(jnp.asarray(logits)), expected, rtol=1e-6)
  expected_t = np.mean([_lse(logits[:, i]) - logits[i, i] for i in range(3)])
  np.testing.assert_allclose(losses.symmetric_info_nce(jnp.asarray(logits)),
                             0.5 * (expected + expected_t), rtol=1e-6)
  other = logits[::-1].copy()
  np.testing.assert_allclose(
      losses.symmetric_info_nce(jnp.asarray(logits), jnp.asarray(other)),
      0.5 * (expected + np.mean([_lse(other[i]) - other[i, i] for i in range(3)])), rtol=1e-6)


def test_info_nce_perfect_and_uniform():
  np.testing.assert_allclose(losses.info_nce(jnp.eye(4) * 1e4), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.info_nce(jnp.zeros((4, 4))), np.log(4), rtol=1e-6)


def test_global_alignment_temperature_scaling():
  k1, k2 = jax.random.split(jax.random.key(0))
  norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  img = norm(jax.random.normal(k1, (6, 8)))
  txt = norm(jax.random.normal(k2, (6, 8)))
  for t in (0.07, 0.5, 1.0):
    np.testing.assert_allclose(losses.global_alignment_loss(img, txt, t),
                               losses.symmetric_info_nce((img @ txt.T) / t), rtol=1e-5)
  # Dividing the temperature by 2 is the same as doubling the logits.
  np.testing.assert_allclose(losses.global_alignment_loss(img, txt, 0.05),
                             losses.symmetric_info_nce(2.0 * (img @ txt.T) / 0.1), rtol=1e-5)
  # Aligned pairs: a lower temperature sharpens the loss towards 0.
  assert (losses.global_alignment_loss(img, img, 0.01)
          < losses.global_alignment_loss(img, img, 1.0))
  grad_t = jax.grad(lambda t: losses.global_alignment_loss(img, txt, t))(0.1)
  assert jnp.isfinite(grad_t) and grad_t != 0


def test_bf16_inputs_give_float32_losses():
  key = jax.random.key(0)
  bf = lambda shape: jax.random.normal(key, shape).astype(jnp.bfloat16)
  restore = jnp.asarray(_restore_batch(2, 16, 0.75))
  images = jax.random.uniform(key, (2, 16, 16, 3)).astype(jnp.bfloat16)
  labels = jnp.asarray([[1, losses.IGNORE, 3], [losses.IGNORE, 0, losses.IGNORE]])
  outs = [
      losses.mim_loss(bf((2, 16, 48)), images, restore, 4,
                      4), *losses.mlm_loss(bf((2, 3, 11)), labels),
      losses.info_nce(bf((4, 4))),
      losses.symmetric_info_nce(bf((4, 4))),
      losses.global_alignment_loss(bf((4, 8)), bf((4, 8)), jnp.bfloat16(0.07)),
      *losses.itm_loss(bf((3, 2)), jnp.asarray([0, 1, 1]))
  ]
  for out in outs:
    assert out.dtype == jnp.float32 and out.shape == ()
    assert jnp.isfinite(out)


# --- retrieval ---------------------------------------------------------------------------------
def test_retrieval_recall_known_ranking():
  # Rank of the positive per row: 0, 1, 2, 0 (i2t); per column: 0, 1, 0, 1 (t2i).
  sim = np.array([[0.9, 0.1, 0.2, 0.0], [0.8, 0.5, 0.1, 0.0], [0.1, 0.6, 0.3, 0.7],
                  [0.0, 0.2, 0.1, 0.4]])
  r = retrieval.recall(sim, ks=(1, 2, 3))
  assert r == {
      "i2t_r1": 0.5, "i2t_r2": 0.75, "i2t_r3": 1.0, "t2i_r1": 0.5, "t2i_r2": 1.0, "t2i_r3": 1.0
  }
  assert all(isinstance(v, float) for v in r.values())
  assert retrieval.recall(jnp.asarray(sim), ks=(1, 2, 3)) == r  # jax arrays too


def test_retrieval_recall_ties_are_pessimistic():
  assert retrieval.recall(np.ones((5, 5)), ks=(1, 4, 5)) == {
      "i2t_r1": 0.0, "i2t_r4": 0.0, "i2t_r5": 1.0, "t2i_r1": 0.0, "t2i_r4": 0.0, "t2i_r5": 1.0
  }
  sim = np.array([
      [0.5, 0.5, 0.1],  # tie with one other: rank 1
      [0.0, 0.9, 0.2],  # clear first
      [0.3, 0.3, 0.3]
  ])  # tie with both: rank 2
  r = retrieval.recall(sim, ks=(1, 2, 3))
  assert r["i2t_r1"] == pytest.approx(1 / 3)
  assert r["i2t_r2"] == pytest.approx(2 / 3)
  assert r["i2t_r3"] == 1.0
  # Columns: col 0 positive 0.5 vs 0.0, 0.3 -> rank 0; col 1: 0.9 vs 0.5, 0.3 -> 0; col 2: 0.3 vs
  # 0.1, 0.2 -> 0.
  assert r["t2i_r1"] == 1.0


def test_retrieval_recall_default_ks_and_identity():
  r = retrieval.recall(np.eye(12) + 0.01 * np.arange(12)[None])
  assert set(r) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
  assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == 1.0
