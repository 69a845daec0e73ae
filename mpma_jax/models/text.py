"""RoBERTa/BERT-style text encoder [M3AE]: word + position + token-type embeddings, LayerNorm,
post-LN transformer layers with exact GELU.

`position_style` reproduces the two Hugging Face conventions so that imported weights see the
positions they were trained with: BERT counts 0..L-1; RoBERTa counts real tokens from pad_id + 1
and gives padding the position pad_id.
"""
import flax.linen as nn
import jax.numpy as jnp

from mpma_jax.models import layers


def position_ids(attention_mask, style: str, pad_id: int):
  """attention_mask [B, L] -> position ids [B, L] for 'bert' or 'roberta'."""
  mask = attention_mask.astype(jnp.int32)
  if style == "bert":
    return jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
  if style == "roberta":
    return jnp.cumsum(mask, axis=1) * mask + pad_id
  raise ValueError(f"text.position_style must be 'bert' or 'roberta', got {style!r}")


class TextEncoder(nn.Module):
  """ids [B, L], attention_mask [B, L] -> tokens [B, L, width]."""
  vocab_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  max_positions: int = 512
  type_vocab_size: int = 2
  pad_id: int = 0
  position_style: str = "bert"
  eps: float = 1e-12
  dropout: float = 0.1
  attn_dropout: float = 0.1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids, attention_mask, deterministic: bool = True):
    pos = position_ids(attention_mask, self.position_style, self.pad_id)  # [B, L]
    embed = lambda n, axes, name: nn.Embed(n, self.width, dtype=self.dtype, name=name,
                                           embedding_init=layers.normal(axes))
    x = embed(self.vocab_size, ("vocab", "embed"), "word_embeddings")(ids)  # [B, L, D]
    x = x + embed(self.max_positions, (None, "embed"), "position_embeddings")(pos)
    x = x + embed(self.type_vocab_size, (None, "embed"), "token_type_embeddings")(
        jnp.zeros_like(ids))
    x = layers.LayerNorm(self.eps, self.dtype, name="embeddings_ln")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = layers.constrain(x)
    mask = layers.key_mask(attention_mask)  # [B, 1, 1, L]
    for i in range(self.layers):
      x = layers.PostLNBlock(self.heads, self.mlp_dim, dropout=self.dropout,
                             attn_dropout=self.attn_dropout, eps=self.eps, dtype=self.dtype,
                             name=f"layer_{i}")(x, mask, deterministic=deterministic)
    return x  # [B, L, D]
