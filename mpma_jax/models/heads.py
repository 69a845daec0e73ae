"""Downstream heads on the pre-trained model (docs/method.md §6) and the fine-tuning model around them.
Which head a task uses is in its row of mpma_jax/tasks.py.

  joint      joint feature [B, 2d] -> linear 2d->2d, LayerNorm, GELU, linear -> [B, C]
             (VQA answer scores for BCE, or class logits for cross-entropy)
  image      image encoder [CLS] [B, Dv] -> linear -> [B, C] (image classification; linear probe:
             the encoder is frozen and its features get no gradient)
  alignment  no new head: GLA global embeddings, and the ITM head for re-ranking (retrieval)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mpma_jax.models import layers
from mpma_jax.models.mpma import MPMA, compute_dtype
from mpma_jax.models.vit import normalize_images

HEADS = ("joint", "image", "alignment")


class JointHead(nn.Module):
  """joint feature [B, 2d] -> [B, num_outputs] [M3AE's VQA / classification head].

  output_bias: initial value of the output biases. For VQA's binary cross-entropy over C answers
  it is the log-odds of 1/C, so that the first steps do not go into pushing C - 1 sigmoids from
  1/2 towards 0 (from zero biases the initial loss is C * log 2, ~345 on VQA-RAD, and Adam moves a
  bias by about one learning rate per step).
  """
  num_outputs: int
  eps: float = 1e-5
  output_bias: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, joint):
    x = layers.Dense(joint.shape[-1], ("embed", "mlp"), self.dtype, name="fc1")(joint)
    x = layers.gelu(layers.LayerNorm(self.eps, self.dtype, name="ln")(x))
    return nn.Dense(
        self.num_outputs, dtype=self.dtype, name="fc2", kernel_init=layers.normal(
            ("embed", "classes")),
        bias_init=nn.with_logical_partitioning(nn.initializers.constant(self.output_bias),
                                               ("classes",)))(x)


class Downstream(nn.Module):
  """The pre-trained MPMA (params under 'mpma', loaded from a pre-training checkpoint) + a head.

  model: the `model` section of the pre-training config (image.size may differ: the position
  embedding is resized when the checkpoint is loaded).
  head_kind: one of HEADS (module doc); output_bias: the joint head's initial output biases.
  """
  model: ml_collections.FrozenConfigDict
  head_kind: str
  num_outputs: int = 0
  output_bias: float = 0.0
  linear_probe: bool = False

  def setup(self):
    if self.head_kind not in HEADS:
      raise ValueError(f"head must be one of {HEADS}, got {self.head_kind!r}")
    self.mpma = MPMA(self.model)
    dt = compute_dtype(self.model.dtype)
    if self.head_kind == "joint":
      self.head = JointHead(self.num_outputs, output_bias=self.output_bias, dtype=dt)
    elif self.head_kind == "image":
      self.head = layers.Dense(self.num_outputs, ("embed", "classes"), dt)

  def __call__(self, batch, deterministic: bool = True):
    """Float32 outputs: logits [B, C] (joint and image heads); for the alignment head the GLA
    global embeddings image [B, G], text [B, G] and the global temperature."""
    m = self.mpma
    if self.head_kind == "image":
      feats = m.image_encoder(normalize_images(batch["image"]), None, deterministic)[:, 0]
      if self.linear_probe:
        feats = jax.lax.stop_gradient(feats)  # [B, Dv]
      return self.head(feats).astype(jnp.float32)
    image = m.embed_image(batch["image"], None, deterministic)  # [B, 1+N, d]
    text = m.embed_text(batch["text_ids"], batch["text_mask"], deterministic)  # [B, L, d]
    if self.head_kind == "alignment":
      image_gla, text_gla = m.align(image, text)
      return {
          "image": image_gla[:, 0], "text": text_gla[:, 0], "temperature": m.gla.temperatures()[0]
      }
    fused = m.fuse(image, text, batch["text_mask"], deterministic)
    return self.head(m.joint_feature(fused)).astype(jnp.float32)

  def itm_scores(self, batch, deterministic: bool = True):
    """Match probability of each (image, text) row of the batch [B] (retrieval re-ranking)."""
    m = self.mpma
    image = m.embed_image(batch["image"], None, deterministic)
    text = m.embed_text(batch["text_ids"], batch["text_mask"], deterministic)
    logits = m.itm_logits(image, text, batch["text_mask"], deterministic)  # [B, 2]
    return jax.nn.softmax(logits, axis=-1)[:, 1]

  def init_all(self, batch):
    """Initialisation touching every module the head uses (alignment: also the ITM path)."""
    out = self(batch)
    if self.head_kind == "alignment":
      out = (out, self.itm_scores(batch))
    return out
