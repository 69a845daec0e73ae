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


def resize_pos_embed(pos, new_grid: int):
  """Bicubic resize of a [1 + g*g, D] position embedding to [1 + new*new, D]; the CLS row is kept."""
  cls, grid = pos[:1], pos[1:]
  old = int(round(np.sqrt(grid.shape[0])))
  if old * old != grid.shape[0]:
    raise ValueError(f"position embedding has {grid.shape[0]} patch rows, not a square grid")
  if old == new_grid:
    return pos
  grid = grid.reshape(old, old, -1)
  grid = jax.image.resize(grid, (new_grid, new_grid, grid.shape[-1]), method="bicubic")
  return jnp.concatenate([cls, grid.reshape(new_grid * new_grid, -1)], axis=0)


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
