import jax
import jax.numpy as jnp
import numpy as np

from mpma_jax.models.vit import VisionTransformer, resize_pos_embed

VIT = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2)


def _setup():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  return images, VIT.init(jax.random.key(1), images)


def test_shapes_and_keep_all_in_order_equals_unmasked():
  images, variables = _setup()
  full = VIT.apply(variables, images)
  assert full.shape == (2, 1 + 16, 32)
  keep = jnp.tile(jnp.arange(16), (2, 1))
  np.testing.assert_allclose(VIT.apply(variables, images, keep), full, atol=1e-5)


def test_masked_pass_sees_only_kept_patches_with_their_positions():
  """Permuting the kept indices permutes the output tokens (position embedding added before the
  gather), and patches outside `keep` have no influence."""
  images, variables = _setup()
  keep = jnp.array([[3, 7, 11, 0], [15, 2, 9, 4]])
  out = VIT.apply(variables, images, keep)
  assert out.shape == (2, 5, 32)
  perm = jnp.array([2, 0, 3, 1])
  out_perm = VIT.apply(variables, images, keep[:, perm])
  np.testing.assert_allclose(out_perm[:, 1:], out[:, 1:][:, perm], atol=1e-5)
  np.testing.assert_allclose(out_perm[:, 0], out[:, 0], atol=1e-5)
  # Patch 1 (pixels [0:8, 8:16]) is not kept by example 0: changing it changes nothing there.
  changed = images.at[0, 0:8, 8:16].add(5.0)
  np.testing.assert_allclose(VIT.apply(variables, changed, keep)[0], out[0], atol=1e-6)


def test_resize_pos_embed_keeps_cls_and_identity():
  pos = jax.random.normal(jax.random.key(0), (1 + 16, 8))
  np.testing.assert_array_equal(resize_pos_embed(pos, 4), pos)
  big = resize_pos_embed(pos, 6)
  assert big.shape == (1 + 36, 8)
  np.testing.assert_array_equal(big[0], pos[0])
