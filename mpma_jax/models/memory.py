"""MA-CMF memory: a learnable matrix of S slots shared by both modalities [paper; form: choice].

Each token queries the memory per head, keeps only its top-k slots, and reads back a softmax-weighted
sum of their values (R2GenCMN's cross-modal memory). The caller adds the response: x' = x + Mem(x).
Because image and report tokens read the same slots, they are written into one space.

Two equivalent implementations of the top-k read, chosen by `memory.impl`:
  masked  scores below the k-th largest are set to -inf, then one dense softmax and matmul over all
          S slots (MXU-friendly; no gather). The k-th largest score comes from `kth_largest`, an
          exact bitwise selection made of elementwise ops and row sums only;
  gather  the k selected values are gathered per token, [B, H, L, k, Dh] (lax.top_k).
Neither materialises a [B, heads, L, S, Dh] tensor.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mpma_jax.models import layers


def _sortable(x):
  """float32 -> uint32 whose unsigned order is the float order (-0.0 just below +0.0)."""
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)  # negative floats: reverse the magnitude
  return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _unsortable(u):
  """The inverse of _sortable."""
  i = jax.lax.bitcast_convert_type(u ^ jnp.uint32(0x80000000), jnp.int32)
  return jax.lax.bitcast_convert_type(jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i), jnp.float32)


def kth_largest(x, k: int):
  """The k-th largest value along the last axis of float32 x (NaN-free), exactly: [..., S] ->
  [..., 1], equal to lax.top_k(x, k)[0][..., -1:]. No gradient flows through it.

  A bitwise search from the most significant bit: the answer (as a sortable uint32) is the largest
  t with count(x >= t) >= k, so 32 rounds of 'count(x >= prefix | bit) >= k' fix its bits. Each
  round is a compare and a row sum, which XLA keeps split over the leading (batch) axes (lax.top_k
  makes the SPMD partitioner gather all of x onto every device).

  The row sum is taken over groups of at most 32 slots, then over the groups, with x split into
  its groups once, before the rounds: XLA then fuses the compare into the sum and a round is one
  pass over x. (A sum over S > 32 slots, or over groups split off inside the loop, becomes an
  XLA:CPU reduce-window that cannot fuse the compare: every round writes and re-reads an int32 copy
  of x, 2.5-3x slower on the tiny and small configs' shapes.)
  """
  u = _sortable(jax.lax.stop_gradient(x).astype(jnp.float32))  # [..., S]
  slots = u.shape[-1]
  width = max(w for w in range(1, min(slots, 32) + 1) if slots % w == 0)  # divides S, <= 32
  groups = u.reshape(u.shape[:-1] + (slots // width, width))  # [..., S / w, w]

  def round_(i, prefix):  # prefix [..., 1]: the answer's bits fixed so far
    candidate = prefix | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))  # [..., 1]
    per_group = jnp.sum(groups >= candidate[..., None], axis=-1, dtype=jnp.int32)  # [..., S / w]
    count = jnp.sum(per_group, axis=-1, keepdims=True)  # [..., 1]
    return jnp.where(count >= k, candidate, prefix)

  bits = jax.lax.fori_loop(0, 32, round_, jnp.zeros(u.shape[:-1] + (1,), jnp.uint32))
  return _unsortable(bits)


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
    if self.impl == "masked":
      kth = kth_largest(scores, self.topk)  # [B, H, L, 1]
      weights = jax.nn.softmax(jnp.where(scores >= kth, scores, -jnp.inf), axis=-1)
      out = jnp.einsum("bhls,shd->blhd", weights.astype(self.dtype), v)  # [B, L, H, Dh]
    elif self.impl == "gather":
      top_scores, top_idx = jax.lax.top_k(scores, self.topk)  # [B, H, L, k]
      weights = jax.nn.softmax(top_scores, axis=-1).astype(self.dtype)  # [B, H, L, k]
      v_heads = jnp.moveaxis(v, 1, 0)  # [H, S, Dh]
      picked = jax.vmap(lambda vh, idx: vh[idx], in_axes=(0, 1), out_axes=1)(v_heads, top_idx)
      # picked: [B, H, L, k, Dh]
      out = jnp.einsum("bhlk,bhlkd->blhd", weights, picked)  # [B, L, H, Dh]
    else:
      raise ValueError(f"memory.impl must be 'masked' or 'gather', got {self.impl!r}")
    return layers.HeadsOut(width, self.dtype, name="out")(out)  # [B, L, D]
