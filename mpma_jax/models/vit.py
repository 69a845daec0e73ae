"""CLIP-style Vision Transformer [M3AE]: conv patch embedding without bias, class token, learned
position embedding, `ln_pre`, pre-LN blocks with QuickGELU, `ln_post` on every token.

With `keep` it runs on the visible patches only (MAE): position embeddings are added to all patches,
then the kept ones are gathered by index (static count), so the encoder cost drops with the mask.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# CLIP's pixel normalisation (RGB), defined once for the JAX model and its PyTorch port.
from mpma_jax.constants import CLIP_MEAN, CLIP_STD
from mpma_jax.models import layers


def normalize_images(images):
  """uint8 (or [0, 255] float) images [B, H, W, 3] -> CLIP-normalised float32."""
  x = images.astype(jnp.float32) / 255.0
  return (x - CLIP_MEAN) / CLIP_STD


# How a position table is resized when the patch grid changes (model.image.pos_resize).
POS_RESIZE = ("torch_bicubic", "jax_bicubic")
TORCH_CUBIC_A = -0.75  # the cubic-convolution coefficient of PyTorch's `bicubic` (Keys: -0.5)


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float64 matrix M such that M @ x resizes x along its first axis exactly as
  torch.nn.functional.interpolate(mode="bicubic", align_corners=False) given `size=` does: source
  coordinate (dst + 0.5) * in / out - 0.5, four taps around it weighted by the cubic convolution
  with a = -0.75, tap indices clamped to the border (no antialiasing when shrinking)."""
  a = TORCH_CUBIC_A
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5  # [out]
  base = np.floor(src)  # [out]
  t = src - base  # [out], in [0, 1)
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)  # [out, 4]
  taps = np.clip(base[:, None] + np.arange(-1, 3), 0, in_size - 1).astype(np.int64)  # [out, 4]
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
  return matrix


def resize_pos_embed(pos, new_grid: int, method: str = "torch_bicubic") -> np.ndarray:
  """[1 + g*g, D] position embedding -> [1 + new*new, D] (host float32); the CLS row is kept and
  the g x g patch rows are resized as an image.

  method (model.image.pos_resize): `torch_bicubic`, PyTorch's `bicubic` with
  `align_corners=False` (what M3AE uses; applied as two 1-D matrices, exact to float32 rounding);
  `jax_bicubic`, `jax.image.resize(method="bicubic")` (Keys a = -0.5, taps outside the grid
  dropped and the weights renormalised, antialiased when shrinking).
  """
  pos = np.asarray(pos, np.float32)
  cls, grid = pos[:1], pos[1:]
  old = int(round(np.sqrt(grid.shape[0])))
  if old * old != grid.shape[0]:
    raise ValueError(f"position embedding has {grid.shape[0]} patch rows, not a square grid")
  if old == new_grid:
    return pos
  grid = grid.reshape(old, old, -1)  # [g, g, D]
  if method == "torch_bicubic":
    m = torch_bicubic_matrix(old, new_grid)  # [new, g]
    grid = np.einsum("ij,jkd,lk->ild", m, grid.astype(np.float64), m)  # [new, new, D]
  elif method == "jax_bicubic":
    grid = jax.image.resize(grid, (new_grid, new_grid, grid.shape[-1]), method="bicubic")
  else:
    raise ValueError(f"model.image.pos_resize must be one of {POS_RESIZE}, got {method!r}")
  grid = np.asarray(grid, np.float32).reshape(new_grid * new_grid, -1)  # [new*new, D]
  return np.concatenate([cls, grid], axis=0)


class VisionTransformer(nn.Module):
  """images [B, H, W, 3] (CLIP-normalised), keep [B, n] or None -> tokens [B, 1 + n, width]."""
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_ratio: float = 4.0
  dtype: layers.Dtype = jnp.float32
  remat: str = "none"  # rematerialisation policy of each block (layers.REMAT_POLICIES)
  scan: bool = False  # run the blocks with nn.scan (layers.stack)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size)**2

  @nn.compact
  def __call__(self, images, keep=None, deterministic: bool = True):
    b, h, w, _ = images.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"image is {h}x{w}, the ViT was built for {self.image_size}")
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), use_bias=False, dtype=self.dtype,
                kernel_init=layers.normal((None, None, "patch", "embed")),
                name="patch_embed")(images.astype(self.dtype))  # [B, h/p, w/p, D]
    x = x.reshape(b, -1, self.width)  # [B, N, D]
    cls = self.param("class_embedding", layers.normal(("embed",)), (self.width,))
    pos = self.param("position_embedding", layers.normal((None, "embed")),
                     (1 + self.num_patches, self.width))
    x = x + pos[1:].astype(self.dtype)
    if keep is not None:
      x = jnp.take_along_axis(x, keep[:, :, None], axis=1)  # [B, n_keep, D]
    cls = jnp.broadcast_to((cls + pos[0]).astype(self.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + n, D]
    x = layers.LayerNorm(1e-5, self.dtype, name="ln_pre")(x)
    blocks = layers.stack(layers.PreLNBlock, self.layers, scan=self.scan, remat_policy=self.remat,
                          deterministic_argnum=3, prefix="block_", num_heads=self.heads,
                          mlp_dim=int(self.width * self.mlp_ratio), activation="quick_gelu",
                          dtype=self.dtype)
    x = blocks(x, None, deterministic)
    return layers.LayerNorm(1e-5, self.dtype, name="ln_post")(x)  # [B, 1 + n, D]
