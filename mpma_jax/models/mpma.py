"""The whole MPMA model (docs/method.md §1): encoders, projections, MA-CMF memory, co-attention fusion,
GLA heads, MIM decoder, MLM head and the optional ITM head.

`MPMA.__call__` is the pre-training forward pass: one fused pass with *both* modalities masked
(paired masking; M3AE's two unpaired passes with `paired=False`) plus, with
`gla.features_from = 'clean'` or ITM, an unmasked encoder pass for alignment and matching.
The batch is the dict produced by `mpma_jax.data.pipeline` (see `BATCH_FIELDS` there).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mpma_jax.constants import IMAGE, TEXT  # modality-type ids [M3AE]
from mpma_jax.models import layers
from mpma_jax.models.decoders import ITMHead, MIMDecoder, MLMHead
from mpma_jax.models.fusion import CoAttentionFusion, Pooler
from mpma_jax.models.gla import GLAHeads
from mpma_jax.models.memory import Memory
from mpma_jax.models.text import TextEncoder
from mpma_jax.models.vit import VisionTransformer, normalize_images

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def stacked_blocks(model_config) -> list[tuple[str, str, int, tuple[str, ...]]]:
  """(module, unrolled block prefix, count, path of the stacked block) of every block stack that
  `model.scan` runs with nn.scan: `{prefix}{i}` unrolled <-> the path, each leaf [count, ...]."""
  c = model_config
  out = [("image_encoder", "block_", c.image.layers, ("blocks",)),
         ("text_encoder", "layer_", c.text.layers, ("layers",)),
         ("mim_decoder", "block_", c.mim.depth, ("blocks",))]
  if c.memory.placement != "every_text_layer":  # (that placement keeps the fusion unrolled)
    out += [("fusion", "text_layer_", c.fusion.layers, ("layers", "text_layer")),
            ("fusion", "image_layer_", c.fusion.layers, ("layers", "image_layer"))]
  return out


def scanned_params(params: dict, model_config) -> dict:
  """Parameters in the unrolled layout ({module: {block_0: .., block_1: ..}}) -> the scanned one
  that MPMA builds with model.scan = True (stacked_blocks). Plain arrays (host or device)."""
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
  for module, prefix, num, path in stacked_blocks(model_config):
    sub = out.get(module)
    if sub is None or f"{prefix}0" not in sub:
      continue
    per_block = [sub.pop(f"{prefix}{i}") for i in range(num)]
    stack = np.stack if isinstance(jax.tree.leaves(per_block)[0], np.ndarray) else jnp.stack
    for key in path[:-1]:
      sub = sub.setdefault(key, {})
    sub[path[-1]] = jax.tree.map(lambda *xs: stack(xs), *per_block)
  return out


def unrolled_params(params: dict, model_config) -> dict:
  """The inverse of `scanned_params`; parameters already unrolled are returned as they are."""
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
  for module, prefix, num, path in stacked_blocks(model_config):
    sub = out.get(module)
    if sub is None or path[0] not in sub:
      continue
    parent = sub
    for key in path[:-1]:
      parent[key] = dict(parent[key])
      parent = parent[key]
    stacked = parent.pop(path[-1])
    if not parent and len(path) > 1:
      del sub[path[0]]
    for i in range(num):
      sub[f"{prefix}{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


class MPMA(nn.Module):
  """config: the `model` section of a pre-training config (see configs/pretrain.py)."""
  config: ml_collections.FrozenConfigDict

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "MPMA":
    """The model of a whole pre-training config (its `model` section, frozen)."""
    return cls(ml_collections.FrozenConfigDict(config.model))

  def setup(self):
    c = self.config
    dt = compute_dtype(c.dtype)
    i, t = c.image, c.text
    scan = c.scan
    self.image_encoder = VisionTransformer(image_size=i.size, patch_size=i.patch, width=i.width,
                                           layers=i.layers, heads=i.heads, mlp_ratio=i.mlp_ratio,
                                           dtype=dt, remat=c.remat, scan=scan)
    self.text_encoder = TextEncoder(vocab_size=t.vocab_size, width=t.width, layers=t.layers,
                                    heads=t.heads, mlp_dim=t.mlp_dim, max_positions=t.max_positions,
                                    type_vocab_size=t.type_vocab_size, pad_id=t.pad_id,
                                    position_style=t.position_style, eps=t.eps, dropout=t.dropout,
                                    attn_dropout=t.attn_dropout, dtype=dt, remat=c.remat, scan=scan)
    self.image_proj = layers.Dense(c.hidden, ("embed", "mlp"), dt)
    self.text_proj = layers.Dense(c.hidden, ("embed", "mlp"), dt)
    self.modality_type = nn.Embed(2, c.hidden, dtype=dt, embedding_init=layers.normal(
        (None, "embed")))
    m = c.memory
    if m.placement not in ("pre_fusion", "every_text_layer"):
      raise ValueError(f"memory.placement must be 'pre_fusion' or 'every_text_layer', "
                       f"got {m.placement!r}")
    self.memory = Memory(m.slots, m.topk, m.heads, m.impl, dtype=dt) if m.enabled else None
    f = c.fusion
    self.fusion = CoAttentionFusion(f.layers, f.heads, f.mlp_dim, f.dropout, f.attn_dropout,
                                    c.mim.layer, dtype=dt, remat=c.remat, scan=scan and
                                    m.placement != "every_text_layer")
    self.text_pooler = Pooler(dt)
    self.image_pooler = Pooler(dt)
    g = c.gla
    self.gla = GLAHeads(g.dim, g.temperature_init, g.temperature_min, dtype=dt)
    num_patches = (i.size // i.patch)**2
    self.mim_decoder = MIMDecoder(num_patches, i.patch * i.patch * 3, c.mim.width, c.mim.depth,
                                  c.mim.heads, activation=c.mim.activation, eps=c.mim.eps, dtype=dt,
                                  remat=c.remat, scan=scan)
    self.mlm_head = MLMHead(t.vocab_size, c.mlm.eps, dtype=dt)
    self.itm_head = ITMHead(dt)

  # --- uni-modal ---------------------------------------------------------------------------------
  def embed_image(self, images, keep=None, deterministic: bool = True):
    """uint8 images [B, H, W, 3] (+ keep [B, n]) -> projected tokens [B, 1+n, d]."""
    x = self.image_encoder(normalize_images(images), keep, deterministic)  # [B, 1+n, Dv]
    x = self.image_proj(x)  # [B, 1+n, d]
    return x + self.modality_type(jnp.full(x.shape[:2], IMAGE, jnp.int32))

  def embed_text(self, ids, attention_mask, deterministic: bool = True):
    """ids, attention_mask [B, L] -> projected tokens [B, L, d]."""
    x = self.text_encoder(ids, attention_mask, deterministic)  # [B, L, Dt]
    x = self.text_proj(x)  # [B, L, d]
    return x + self.modality_type(jnp.full(x.shape[:2], TEXT, jnp.int32))

  def align(self, image_tokens, text_tokens):
    """GLA embeddings (L2-normalised, float32): image [B, 1+P, G], text [B, L, G]."""
    return self.gla(image_tokens, text_tokens)

  # --- cross-modal -------------------------------------------------------------------------------
  def fuse(self, image_tokens, text_tokens, text_mask, deterministic: bool = True):
    """MA-CMF memory read + K co-attention layers -> dict(text, image, image_at_mim_layer)."""
    per_layer_memory = None
    if self.memory is not None:
      image_tokens = image_tokens + self.memory(image_tokens)  # V' = V + Mem(V)
      if self.config.memory.placement == "pre_fusion":
        text_tokens = text_tokens + self.memory(text_tokens)  # T' = T + Mem(T)
      else:
        per_layer_memory = self.memory
    image_mask = jnp.ones(image_tokens.shape[:2], jnp.int32)
    return self.fusion(text_tokens, text_mask, image_tokens, image_mask, per_layer_memory,
                       deterministic)

  def joint_feature(self, fused):
    """Pooled text [CLS] ⊕ pooled image [CLS] -> [B, 2d], the input of every downstream head."""
    return jnp.concatenate([self.text_pooler(fused["text"]),
                            self.image_pooler(fused["image"])], axis=-1)

  def itm_logits(self, image_tokens, text_tokens, text_mask, deterministic: bool = True):
    fused = self.fuse(image_tokens, text_tokens, text_mask, deterministic)
    return self.itm_head(self.joint_feature(fused)).astype(jnp.float32)  # [B, 2]

  # --- pre-training ------------------------------------------------------------------------------
  def __call__(self, batch, deterministic: bool = True, with_itm: bool = False,
               paired: bool = True):
    """The pre-training forward pass. Returns float32 outputs for the losses:

    mim_pred [B, N, p*p*3], mlm_logits [B, L, V], image_gla [B, 1+P, G], text_gla [B, L, G],
    temperature_global, temperature_local, and with_itm: itm_logits [B, 2], itm_labels [B].

    paired (masking.paired): True = MPMA's paired masking, one fused pass with both modalities
    masked; False = M3AE's two passes, MLM with the full image and MIM with the full text (GLA
    then reads those unmasked features whatever gla.features_from says). ITM always reads the
    unmasked image and text.
    """
    c = self.config
    if c.gla.features_from not in ("clean", "masked"):
      raise ValueError(
          f"gla.features_from must be 'clean' or 'masked', got {c.gla.features_from!r}")
    text_mask = batch["text_mask"]
    image = self.embed_image(batch["image"], batch["image_keep"], deterministic)  # [B, 1+n, d]
    text = self.embed_text(batch["mlm_ids"], text_mask, deterministic)  # [B, L, d]
    clean_image = clean_text = None
    if not paired or with_itm or c.gla.features_from == "clean":  # an unmasked encoder pass
      clean_image = self.embed_image(batch["image"], None, deterministic)  # [B, 1+N, d]
      clean_text = self.embed_text(batch["text_ids"], text_mask, deterministic)  # [B, L, d]
    if paired and c.gla.features_from == "masked":  # reuse the masked pass (FLIP-style)
      image_gla, text_gla = self.align(image, text)  # [B, 1+n, G], [B, L, G]
    else:
      image_gla, text_gla = self.align(clean_image, clean_text)  # [B, 1+N, G], [B, L, G]
    t_global, t_local = self.gla.temperatures()

    if paired:
      fused = self.fuse(image, text, text_mask, deterministic)
      mim_stream, mlm_stream = fused["image_at_mim_layer"], fused["text"]  # [B, 1+n, d], [B, L, d]
    else:
      mlm_stream = self.fuse(clean_image, text, text_mask, deterministic)["text"]  # [B, L, d]
      mim_stream = self.fuse(image, clean_text, text_mask,
                             deterministic)["image_at_mim_layer"]  # [B, 1+n, d]
    out = {
        "mim_pred": self.mim_decoder(mim_stream, batch["image_restore"],
                                     deterministic).astype(jnp.float32),
        "mlm_logits": self.mlm_head(mlm_stream).astype(jnp.float32),
        "image_gla": image_gla,
        "text_gla": text_gla,
        "temperature_global": t_global,
        "temperature_local": t_local,
    }
    if with_itm:
      # Half the pairs (drawn from the 'itm' rng stream) get another example's image.
      b = clean_image.shape[0]
      k_label, k_shift = jax.random.split(self.make_rng("itm"))
      labels = jax.random.bernoulli(k_label, 0.5, (b,)).astype(jnp.int32)  # 1 = matched
      shift = jax.random.randint(k_shift, (b,), 1, max(b, 2))
      source = jnp.where(labels == 1, jnp.arange(b), (jnp.arange(b) + shift) % b)
      out["itm_logits"] = self.itm_logits(clean_image[source], clean_text, text_mask, deterministic)
      out["itm_labels"] = labels
    return out
