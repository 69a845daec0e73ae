import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpma_jax.models.vit import VisionTransformer, resize_pos_embed, torch_bicubic_matrix

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


def _fields(grid: int, dim: int = 6) -> dict[str, np.ndarray]:
  """[1 + g*g, D] position tables: white noise, and a smooth field (low-frequency waves)."""
  rng = np.random.default_rng(grid)
  y, x = np.meshgrid(np.linspace(0, 1, grid), np.linspace(0, 1, grid), indexing="ij")
  phase = rng.uniform(0, 2 * np.pi, dim)
  smooth = np.sin(2 * np.pi * (x[..., None] + 0.5 * y[..., None]) + phase)  # [g, g, D]
  cls = rng.standard_normal((1, dim))
  return {
      "random": np.concatenate([cls, rng.standard_normal((grid * grid, dim))]).astype(np.float32),
      "smooth": np.concatenate([cls, smooth.reshape(grid * grid, dim)]).astype(np.float32)
  }


@pytest.mark.parametrize("old,new", [(14, 18), (18, 24), (24, 14), (4, 6), (5, 2)])
@pytest.mark.parametrize("field", ["random", "smooth"])
def test_torch_bicubic_resize_matches_pytorch(old, new, field):
  """The default resize is PyTorch's interpolate(mode="bicubic", align_corners=False), which M3AE
  applies to CLIP's table, up and down."""
  torch = pytest.importorskip("torch")
  pos = _fields(old)[field]
  got = resize_pos_embed(pos, new)
  grid = torch.from_numpy(pos[1:].reshape(1, old, old, -1)).permute(0, 3, 1, 2)  # [1, D, g, g]
  want = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
  want = want.permute(0, 2, 3, 1).reshape(new * new, -1).numpy()  # [new*new, D]
  assert got.shape == (1 + new * new, pos.shape[1]) and got.dtype == np.float32
  np.testing.assert_array_equal(got[0], pos[0])
  np.testing.assert_allclose(got[1:], want, rtol=0, atol=1e-5)


def test_torch_bicubic_matrix_rows_sum_to_one_and_keep_constants():
  for old, new in ((3, 7), (7, 3), (18, 24)):
    m = torch_bicubic_matrix(old, new)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
  np.testing.assert_allclose(torch_bicubic_matrix(5, 5), np.eye(5), atol=1e-12)


def test_pos_resize_methods():
  """jax_bicubic is jax.image.resize (Keys a = -0.5): a different table from PyTorch's."""
  pos = _fields(4)["random"]
  jax_way = resize_pos_embed(pos, 6, "jax_bicubic")
  want = jax.image.resize(pos[1:].reshape(4, 4, -1), (6, 6, pos.shape[1]), method="bicubic")
  np.testing.assert_allclose(jax_way[1:], np.asarray(want).reshape(36, -1), atol=1e-6)
  assert np.max(np.abs(jax_way - resize_pos_embed(pos, 6, "torch_bicubic"))) > 1e-2
  with pytest.raises(ValueError, match="model.image.pos_resize"):
    resize_pos_embed(pos, 6, "bilinear")
