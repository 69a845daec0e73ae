"""GLA: global and local alignment of uni-modal features, before fusion [paper; form: choice].

One d->gla.dim head per modality is applied to every token and L2-normalised; token 0 (CLS) gives
the global embedding, the other tokens the local ones. Global similarity is a dot product; local
similarity is FILIP-style late interaction (`filip`) or GLoRIA-style word-attended image context
(`attention`). Both local forms are computed a chunk of images at a time (`map_rows`: on a mesh,
each chip its own images), so memory grows as [chunk, B, P, L] rather than [B, B, P, L].
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mpma_jax import sharding
from mpma_jax.models import layers

_NEG = -1e9  # a finite -inf, so that masked-out entries never turn into NaN gradients


def l2_normalize(x, eps: float = 1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class GLAHeads(nn.Module):
  """Projection heads and the two learnable temperatures (initialised at `temperature_init`)."""
  dim: int = 256
  temperature_init: float = 0.07
  temperature_min: float = 0.01
  dtype: layers.Dtype = jnp.float32

  def setup(self):
    self.image_head = layers.Dense(self.dim, ("embed", "gla"), self.dtype)
    self.text_head = layers.Dense(self.dim, ("embed", "gla"), self.dtype)
    init = nn.with_logical_partitioning(nn.initializers.constant(jnp.log(self.temperature_init)),
                                        ())
    self.log_temperature_global = self.param("log_temperature_global", init, ())
    self.log_temperature_local = self.param("log_temperature_local", init, ())

  def __call__(self, image_tokens, text_tokens):
    """image [B, 1+P, D], text [B, L, D] -> L2-normalised [B, 1+P, G], [B, L, G] (float32)."""
    return l2_normalize(self.image_head(image_tokens)), l2_normalize(self.text_head(text_tokens))

  def temperatures(self):
    """(global, local) temperatures: the value is clamped to >= temperature_min, the gradient is
    d exp(log_t) whether clamped or not (see `clamp_straight_through`)."""
    clamp = lambda log_t: clamp_straight_through(jnp.exp(log_t), self.temperature_min)
    return clamp(self.log_temperature_global), clamp(self.log_temperature_local)


def clamp_straight_through(x, lower: float):
  """max(x, lower) in value, identity in gradient. A plain maximum gives a clamped temperature a
  zero gradient, so its parameter could never leave the floor again; CLIP instead clamps the
  parameter's value and keeps its gradient, which this reproduces inside the loss."""
  return jax.lax.stop_gradient(jnp.maximum(x, lower)) + (x - jax.lax.stop_gradient(x))


def _batch_shards() -> int:
  """How many ways the current mesh splits a batch axis (sharding.BATCH_AXES); 1 outside a mesh."""
  shape = jax.sharding.get_abstract_mesh().shape
  return math.prod(shape.get(axis, 1) for axis in sharding.BATCH_AXES)


def replicated(x):
  """x held whole by every chip of the current mesh (gathered once, before a loop that reads all of
  it in every step); x itself outside a mesh."""
  if _batch_shards() <= 1 or not jax.sharding.get_abstract_mesh().are_all_axes_auto:
    return x
  return jax.lax.with_sharding_constraint(x, P())


def map_rows(fn, x, chunk: int):
  """jax.lax.map(fn, x, batch_size=chunk), with each step taking rows that the chips hold.

  lax.map slices contiguous chunks of x's rows; with the batch split over D chips each chunk lies
  on one chip, and XLA all-gathers the whole of x onto every chip in every step (and again in the
  backward pass): for the local alignment, the global batch's patch features, once per chunk. Here
  x [B, ...] is cut into the D chips' blocks and every step takes up to `chunk` rows of each block
  ([steps, D, c, ...], the D axis split as the batch is): no step reads another chip's rows and
  each chip computes its own rows. The result is the same as lax.map's, rows in order."""
  b, shards = x.shape[0], _batch_shards()
  if shards <= 1 or b % shards:
    return jax.lax.map(fn, x, batch_size=chunk)
  per = b // shards  # rows per chip
  c = math.gcd(chunk, per)  # rows per chip per step
  xs = x.reshape((shards, per // c, c) + x.shape[1:]).swapaxes(0, 1)  # [steps, D, c, ...]
  if jax.sharding.get_abstract_mesh().are_all_axes_auto:  # (explicit axes carry it already)
    xs = jax.lax.with_sharding_constraint(xs, P(None, sharding.BATCH_AXES))
  out = jax.lax.map(jax.vmap(jax.vmap(fn)), xs)  # [steps, D, c, ...] per output
  return jax.tree.map(lambda o: o.swapaxes(0, 1).reshape((b,) + o.shape[3:]), out)


def filip_similarity(image, text, word_mask, chunk: int = 8):
  """FILIP late interaction.

  image [Bi, P, G], text [Bt, L, G] (normalised), word_mask [Bt, L] (real words only) ->
    i2t [Bi, Bt]: for each patch the max cosine over the text's words, averaged over patches;
    t2i [Bt, Bi]: for each real word the max cosine over the image's patches, averaged over words.
  Padding and special tokens never contribute.
  """
  # every image is scored against every text: the texts are gathered once, the images stay put
  text, word_mask = replicated(text), replicated(word_mask.astype(bool))
  has_words = word_mask.any(-1)  # [Bt]; a text without words scores 0 (and stays finite)
  n_words = jnp.maximum(word_mask.sum(-1), 1).astype(jnp.float32)  # [Bt]

  def one_image(img):  # img [P, G]
    sim = jnp.einsum("pg,tlg->tpl", img, text)  # [Bt, P, L]
    best_word = jnp.max(jnp.where(word_mask[:, None, :], sim, _NEG), axis=-1)  # [Bt, P]
    best_patch = jnp.max(sim, axis=1)  # [Bt, L]
    i2t = jnp.where(has_words, jnp.mean(best_word, axis=-1), 0.0)  # [Bt]
    t2i = jnp.sum(jnp.where(word_mask, best_patch, 0.0), axis=-1) / n_words  # [Bt]
    return i2t, t2i

  i2t, t2i = map_rows(one_image, image.astype(jnp.float32), chunk)  # [Bi, Bt] each
  return i2t, t2i.T


def attention_similarity(image, text, word_mask, attention_temp: float = 4.0, agg_temp: float = 5.0,
                         chunk: int = 8):
  """GLoRIA-style local similarity, symmetric: [Bi, Bt] and its transpose.

  Each word attends over the image's patches (softmax of attention_temp * cosine); the word's
  score is the cosine between the word and its attended context; the pair score aggregates the
  real words with a log-sum-exp at agg_temp.
  """
  # every image is scored against every text: the texts are gathered once, the images stay put
  text, word_mask = replicated(text), replicated(word_mask.astype(bool))

  def one_image(img):  # img [P, G]
    sim = jnp.einsum("pg,tlg->tlp", img, text)  # [Bt, L, P]
    attn = jax.nn.softmax(attention_temp * sim, axis=-1)
    context = l2_normalize(jnp.einsum("tlp,pg->tlg", attn, img))  # [Bt, L, G]
    word_score = jnp.sum(context * text, axis=-1)  # [Bt, L]
    word_score = jnp.where(word_mask, agg_temp * word_score, _NEG)
    lse = jax.nn.logsumexp(word_score, axis=-1) / agg_temp  # [Bt]
    return jnp.where(word_mask.any(-1), lse, 0.0)

  sim = map_rows(one_image, image.astype(jnp.float32), chunk)  # [Bi, Bt]
  return sim, sim.T
