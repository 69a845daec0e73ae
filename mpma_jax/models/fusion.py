"""Co-attention fusion [M3AE]: K layers per stream, two symmetric streams.

Text stream layer:  self-attn -> cross-attn to the image -> FFN (post-LN, BERT cross layer).
Image stream layer: self-attn -> cross-attn to the text  -> FFN.
Both streams read the *previous* layer's output of the other stream. With
`memory.placement = 'every_text_layer'` the shared memory is read by the text stream before every
layer (the pre-fusion read is done by the caller in either placement).
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from mpma_jax.models import layers
from mpma_jax.models.memory import Memory


class CoAttentionFusion(nn.Module):
  """text [B, L, D], image [B, 1+n, D] -> dict(text, image, image_at_mim_layer)."""
  layers: int
  heads: int
  mlp_dim: int
  dropout: float = 0.1
  attn_dropout: float = 0.1
  mim_layer: int = 3  # 1-based layer whose image output feeds the MIM decoder
  dtype: layers.Dtype = jnp.float32
  remat: str = "none"  # rematerialisation policy of each layer (layers.REMAT_POLICIES)

  @nn.compact
  def __call__(self, text, text_mask, image, image_mask, memory: Optional[Memory] = None,
               deterministic: bool = True):
    if not 1 <= self.mim_layer <= self.layers:
      raise ValueError(f"mim.layer must be in [1, fusion.layers={self.layers}], got {self.mim_layer}")
    t_keys = layers.key_mask(text_mask)  # [B, 1, 1, L]
    i_keys = layers.key_mask(image_mask)  # [B, 1, 1, 1+n]
    block_cls = layers.remat(layers.PostLNBlock, self.remat, deterministic_argnum=5)
    block = lambda name: block_cls(
        self.heads, self.mlp_dim, cross=True, dropout=self.dropout,
        attn_dropout=self.attn_dropout, dtype=self.dtype, name=name)
    image_at_mim = None
    for i in range(self.layers):
      if memory is not None:
        text = text + memory(text)
      new_text = block(f"text_layer_{i}")(text, t_keys, image, i_keys, deterministic)
      new_image = block(f"image_layer_{i}")(image, i_keys, text, t_keys, deterministic)
      text, image = new_text, new_image  # [B, L, D], [B, 1+n, D]
      if i + 1 == self.mim_layer:
        image_at_mim = image
    return {"text": text, "image": image, "image_at_mim_layer": image_at_mim}


class Pooler(nn.Module):
  """Dense d->d + tanh on token 0 [M3AE]."""
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(layers.Dense(x.shape[-1], ("embed", "mlp"), self.dtype, name="dense")(x[:, 0]))
