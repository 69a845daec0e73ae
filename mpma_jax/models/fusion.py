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
  # Run the K layer pairs with nn.scan (model.scan): parameters under layers/{text,image}_layer,
  # each [K, ...]. The image stream's last layer then always runs (unrolled, XLA drops it when
  # only the pooler reads it and nothing is pooled).
  scan: bool = False

  @nn.compact
  def __call__(self, text, text_mask, image, image_mask, memory: Optional[Memory] = None,
               deterministic: bool = True):
    if not 1 <= self.mim_layer <= self.layers:
      raise ValueError(
          f"mim.layer must be in [1, fusion.layers={self.layers}], got {self.mim_layer}")
    t_keys = layers.key_mask(text_mask)  # [B, 1, 1, L]
    i_keys = layers.key_mask(image_mask)  # [B, 1, 1, 1+n]
    if self.scan:
      if memory is not None:
        raise ValueError("a scanned fusion cannot read the memory in every layer "
                         "(memory.placement='every_text_layer' needs model.scan=False)")
      pair = nn.scan(_LayerPair, variable_axes={"params": 0},
                     split_rngs={"params": True,
                                 "dropout": True}, in_axes=nn.broadcast, length=self.layers,
                     metadata_params={nn.PARTITION_NAME: "layers"
                                     })(self.heads, self.mlp_dim, self.dropout, self.attn_dropout,
                                        self.dtype, self.remat, name="layers")
      (text, image), per_layer = pair((text, image), t_keys, i_keys, deterministic)
      # per_layer: the image stream after each layer, [K, B, 1+n, D]
      return {"text": text, "image": image, "image_at_mim_layer": per_layer[self.mim_layer - 1]}
    block_cls = layers.remat(layers.PostLNBlock, self.remat, deterministic_argnum=5)
    block = lambda name: block_cls(self.heads, self.mlp_dim, cross=True, dropout=self.dropout,
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


class _LayerPair(nn.Module):
  """One fusion layer of both streams, in nn.scan's form: ((text, image), masks) ->
  ((text', image'), image')."""
  heads: int
  mlp_dim: int
  dropout: float
  attn_dropout: float
  dtype: layers.Dtype
  remat: str

  @nn.compact
  def __call__(self, carry, t_keys, i_keys, deterministic: bool = True):
    text, image = carry
    block_cls = layers.remat(layers.PostLNBlock, self.remat, deterministic_argnum=5,
                             prevent_cse=False)
    block = lambda name: block_cls(self.heads, self.mlp_dim, cross=True, dropout=self.dropout,
                                   attn_dropout=self.attn_dropout, dtype=self.dtype, name=name)
    new_text = block("text_layer")(text, t_keys, image, i_keys, deterministic)
    new_image = block("image_layer")(image, i_keys, text, t_keys, deterministic)
    return (new_text, new_image), new_image


class Pooler(nn.Module):
  """Dense d->d + tanh on token 0 [M3AE]."""
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(layers.Dense(x.shape[-1], ("embed", "mlp"), self.dtype, name="dense")(x[:, 0]))
