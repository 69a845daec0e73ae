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


def longest_text(max_positions: int, style: str, pad_id: int) -> int:
  """The most tokens a text encoder with max_positions position rows reads: 'bert' numbers them
  0..L-1, 'roberta' pad_id+1..pad_id+L. A longer text would index past the table, which a JAX
  gather answers with NaN, not an error."""
  return max_positions - pad_id - 1 if style == "roberta" else max_positions


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
  remat: str = "none"  # rematerialisation policy of each layer (layers.REMAT_POLICIES)
  scan: bool = False  # run the layers with nn.scan (layers.stack)

  @nn.compact
  def __call__(self, ids, attention_mask, deterministic: bool = True):
    pos = position_ids(attention_mask, self.position_style, self.pad_id)  # [B, L]

    def lookup(name, rows, axes, index):  # [B, L] -> [B, L, D]
      table = self.param(name, layers.normal(axes), (rows, self.width))  # [rows, D]
      # Gathered whole (FSDP gathers every weight before use anyway): a lookup into a table split
      # over 'embed' would hand its split to the batch-split activations, which XLA can only fix
      # by replicating them.
      table = nn.with_logical_constraint(table, (None, None))
      return layers.constrain(jnp.take(table, index, axis=0).astype(self.dtype))

    x = lookup("word_embeddings", self.vocab_size, ("vocab", "embed"), ids)  # [B, L, D]
    x = x + lookup("position_embeddings", self.max_positions, (None, "embed"), pos)
    x = x + lookup("token_type_embeddings", self.type_vocab_size,
                   (None, "embed"), jnp.zeros_like(ids))
    x = layers.LayerNorm(self.eps, self.dtype, name="embeddings_ln")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = layers.constrain(x)
    mask = layers.key_mask(attention_mask)  # [B, 1, 1, L]
    blocks = layers.stack(layers.PostLNBlock, self.layers, scan=self.scan, remat_policy=self.remat,
                          deterministic_argnum=5, prefix="layer_", num_heads=self.heads,
                          mlp_dim=self.mlp_dim, dropout=self.dropout,
                          attn_dropout=self.attn_dropout, eps=self.eps, dtype=self.dtype)
    x = blocks(x, mask, None, None, deterministic)
    return x  # [B, L, D]
