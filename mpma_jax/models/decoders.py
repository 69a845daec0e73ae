"""Reconstruction and matching heads: MIM decoder (pixels), MLM head (vocabulary), ITM head."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

# sincos_2d (numpy) is defined once for the JAX model, its PyTorch port and the M3AE import.
from mpma_jax.constants import sincos_2d
from mpma_jax.models import layers


class MIMDecoder(nn.Module):
  """image stream [B, 1+n_keep, D], restore [B, N] -> predicted patches [B, N, p*p*3].

  Linear D -> width, mask tokens re-inserted in the original patch order, fixed 2-D sin-cos
  positions, pre-LN blocks, LayerNorm, linear to pixels.
  """
  num_patches: int
  patch_pixels: int  # p*p*3
  width: int = 384
  depth: int = 4
  heads: int = 6
  mlp_ratio: float = 4.0
  activation: str = "gelu"  # of the blocks' MLP (layers.ACTIVATIONS)
  eps: float = 1e-6  # LayerNorm epsilon
  dtype: layers.Dtype = jnp.float32
  remat: str = "none"  # rematerialisation policy of each block (layers.REMAT_POLICIES)
  scan: bool = False  # run the blocks with nn.scan (layers.stack)

  @nn.compact
  def __call__(self, x, restore, deterministic: bool = True):
    b = x.shape[0]
    x = layers.Dense(self.width, ("embed", "mlp"), self.dtype, name="embed")(x)  # [B, 1+n, W]
    mask_token = self.param("mask_token", layers.normal((None, None, "embed")), (1, 1, self.width))
    n_masked = self.num_patches - (x.shape[1] - 1)
    fill = jnp.broadcast_to(mask_token.astype(self.dtype), (b, n_masked, self.width))
    patches = jnp.concatenate([x[:, 1:], fill], axis=1)  # [B, N, W], kept first, then masked
    patches = jnp.take_along_axis(patches, restore[:, :, None], axis=1)  # original order
    x = jnp.concatenate([x[:, :1], patches], axis=1)  # [B, 1+N, W]
    grid = int(round(np.sqrt(self.num_patches)))
    x = x + jnp.asarray(sincos_2d(grid, self.width), self.dtype)
    blocks = layers.stack(layers.PreLNBlock, self.depth, scan=self.scan, remat_policy=self.remat,
                          deterministic_argnum=3, prefix="block_", num_heads=self.heads,
                          mlp_dim=int(self.width * self.mlp_ratio), activation=self.activation,
                          eps=self.eps, dtype=self.dtype)
    x = blocks(x, None, deterministic)
    x = layers.LayerNorm(self.eps, self.dtype, name="ln")(x)
    return layers.Dense(self.patch_pixels, ("embed", "patch"), self.dtype, name="pred")(x[:, 1:])


class MLMHead(nn.Module):
  """text stream [B, L, D] -> logits [B, L, V]: dense + GELU + LayerNorm, then vocab + bias."""
  vocab_size: int
  eps: float = 1e-12
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.Dense(x.shape[-1], ("embed", "mlp"), self.dtype, name="transform")(x)
    x = layers.LayerNorm(self.eps, self.dtype, name="ln")(layers.gelu(x))
    return layers.Dense(self.vocab_size, ("embed", "vocab"), self.dtype, name="decoder")(x)


class ITMHead(nn.Module):
  """joint feature [B, 2D] -> match logits [B, 2]."""
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, joint):
    return layers.Dense(2, ("embed", "classes"), self.dtype, name="fc")(joint)
