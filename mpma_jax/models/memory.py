"""MA-CMF memory: a learnable matrix of S slots shared by both modalities [paper; form: choice].

Each token queries the memory per head, keeps only its top-k slots, and reads back a softmax-weighted
sum of their values (R2GenCMN's cross-modal memory). The caller adds the response: x' = x + Mem(x).
Because image and report tokens read the same slots, they are written into one space.

Two equivalent implementations of the top-k read, chosen by `memory.impl`:
  masked  scores below the k-th largest are set to -inf, then one dense softmax and matmul over all
          S slots (MXU-friendly; no gather);
  gather  the k selected values are gathered per token, [B, H, L, k, Dh].
Neither materialises a [B, heads, L, S, Dh] tensor.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mpma_jax.models import layers


class Memory(nn.Module):
  """x [B, L, D] -> memory response [B, L, D]."""
  slots: int = 2048
  topk: int = 32
  heads: int = 8
  impl: str = "masked"
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f"memory: width {width} is not divisible by memory.heads {self.heads}")
    if not 1 <= self.topk <= self.slots:
      raise ValueError(f"memory.topk must be in [1, memory.slots={self.slots}], got {self.topk}")
    head_dim = width // self.heads
    # normal(0, 1/d) as in R2GenCMN (std 1/d).
    memory = self.param("memory", layers.normal(("slots", "embed"), std=1.0 / width),
                        (self.slots, width)).astype(self.dtype)  # [S, D]

    proj = lambda name, inp: layers.HeadsIn(self.heads, head_dim, self.dtype, name=name)(inp)

    q = proj("query", x)  # [B, L, H, Dh]
    k = proj("key", memory)  # [S, H, Dh]
    v = proj("value", memory)  # [S, H, Dh]
    scores = jnp.einsum("blhd,shd->bhls", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    # scores: [B, H, L, S]
    top_scores, top_idx = jax.lax.top_k(scores, self.topk)  # [B, H, L, k]
    if self.impl == "masked":
      kth = top_scores[..., -1:]  # [B, H, L, 1]
      weights = jax.nn.softmax(jnp.where(scores >= kth, scores, -jnp.inf), axis=-1)
      out = jnp.einsum("bhls,shd->blhd", weights.astype(self.dtype), v)  # [B, L, H, Dh]
    elif self.impl == "gather":
      weights = jax.nn.softmax(top_scores, axis=-1).astype(self.dtype)  # [B, H, L, k]
      v_heads = jnp.moveaxis(v, 1, 0)  # [H, S, Dh]
      picked = jax.vmap(lambda vh, idx: vh[idx], in_axes=(0, 1), out_axes=1)(v_heads, top_idx)
      # picked: [B, H, L, k, Dh]
      out = jnp.einsum("bhlk,bhlkd->blhd", weights, picked)  # [B, L, H, Dh]
    else:
      raise ValueError(f"memory.impl must be 'masked' or 'gather', got {self.impl!r}")
    return layers.HeadsOut(width, self.dtype, name="out")(out)  # [B, L, D]
