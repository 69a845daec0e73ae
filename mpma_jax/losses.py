"""Pre-training losses (docs/method.md §4) as pure functions, and `compute_losses`, which weighs them into
the objective.

Every loss casts its inputs to float32 first, so that bf16 compute never reaches a reduction (§7).
The contrastive losses take whatever batch they are given: pass the global batch (negatives from
every device) by calling them on globally sharded arrays.
"""
import jax
import jax.numpy as jnp
import ml_collections

from mpma_jax.masking import IGNORE  # label at positions the MLM loss skips
from mpma_jax.models import gla
from mpma_jax.models.vit import normalize_images


def patchify(images, patch: int):
  """images [B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]: row-major patches, (p_row, p_col, C) inside."""
  b, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
  gh, gw = h // patch, w // patch
  x = images.reshape(b, gh, patch, gw, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gh, gw, p, p, C]; same patch order as the ViT's conv
  return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches, patch: int, channels: int = 3):
  """patches [B, N, p*p*C] -> square images [B, H, W, C]; the inverse of `patchify`."""
  b, n, d = patches.shape
  g = int(round(n**0.5))
  if g * g != n:
    raise ValueError(f"{n} patches do not form a square grid")
  if d != patch * patch * channels:
    raise ValueError(f"patch dim {d} != patch*patch*channels = {patch * patch * channels}")
  x = patches.reshape(b, g, g, patch, patch, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, g, p, g, p, C]
  return x.reshape(b, g * patch, g * patch, channels)


def mim_loss(pred, images, image_restore, num_kept: int, patch: int, norm_pix: bool = True,
             eps: float = 1e-6, unbiased_var: bool = False):
  """MSE between predicted and target pixels, averaged over masked patches only -> scalar.

  pred [B, N, p*p*C] in the original patch order; images [B, H, W, C]; image_restore [B, N]
  (patch j is masked iff restore[j] >= num_kept). With norm_pix each target patch is standardised:
  (x - mean) / sqrt(var + eps), var over the patch's p*p*C values, divided by n (population) or,
  with unbiased_var (model.mim.target_var_unbiased; MAE's and M3AE's torch.var), by n - 1.
  """
  pred = pred.astype(jnp.float32)
  target = patchify(images.astype(jnp.float32), patch)  # [B, N, p*p*C]
  if pred.shape != target.shape:
    raise ValueError(f"pred is {pred.shape}, the patchified images are {target.shape}")
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1 if unbiased_var else 0)  # [B, N, 1]
    target = (target - mean) / jnp.sqrt(var + eps)
  per_patch = jnp.mean((pred - target)**2, axis=-1)  # [B, N]
  masked = image_restore >= num_kept  # [B, N]
  # `where`, not a product, so that visible predictions get an exactly zero gradient.
  total = jnp.sum(jnp.where(masked, per_patch, 0.0))
  return total / jnp.maximum(jnp.sum(masked), 1).astype(jnp.float32)


def _masked_ce(logits, labels, valid):
  """Mean cross-entropy and accuracy over the `valid` positions (0 and 0 when there are none)."""
  logits = logits.astype(jnp.float32)
  safe = jnp.where(valid, labels, 0)  # IGNORE is not a valid index
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  loss = jnp.sum(jnp.where(valid, nll, 0.0)) / count
  correct = (jnp.argmax(logits, axis=-1) == safe) & valid
  return loss, jnp.sum(correct).astype(jnp.float32) / count


def mlm_loss(logits, labels):
  """logits [B, L, V], labels [B, L] (IGNORE where not chosen) -> (mean CE, accuracy) on chosen."""
  return _masked_ce(logits, labels, labels != IGNORE)


def info_nce(logits):
  """logits [B, B], row i's positive in column i -> mean cross-entropy over rows."""
  logits = logits.astype(jnp.float32)
  if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
    raise ValueError(f"info_nce needs square logits [B, B], got {logits.shape}")
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.diagonal(logp))


def symmetric_info_nce(logits_i2t, logits_t2i=None):
  """Mean of image->text and text->image InfoNCE; logits_t2i defaults to logits_i2t.T."""
  if logits_t2i is None:
    logits_t2i = logits_i2t.T
  return 0.5 * (info_nce(logits_i2t) + info_nce(logits_t2i))


def global_alignment_loss(image_emb, text_emb, temperature):
  """image_emb, text_emb [B, D] (L2-normalised), temperature scalar -> symmetric InfoNCE."""
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  logits = image_emb @ text_emb.T / jnp.asarray(temperature, jnp.float32)  # [B, B]
  return symmetric_info_nce(logits)


def itm_loss(logits, labels):
  """logits [B, 2], labels [B] in {0, 1} (1 = matched) -> (mean CE, accuracy)."""
  return _masked_ce(logits, labels, jnp.ones(labels.shape, bool))


# --- the pre-training objective (docs/method.md §4) ------------------------------------------------------
LOSS_NAMES = ("mlm", "mim", "global", "local", "itm")


def loss_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {
      "mlm": config.loss.mlm, "mim": config.loss.mim, "global": config.loss.global_,
      "local": config.loss.local, "itm": config.loss.itm
  }


def compute_losses(out: dict, batch: dict, config: ml_collections.ConfigDict):
  """Model outputs + batch -> (weighted total, metrics). All in float32; a loss whose weight is 0
  is not computed."""
  w = loss_weights(config)
  m = config.model
  metrics = {}
  if w["mlm"]:
    metrics["mlm"], metrics["mlm_acc"] = mlm_loss(out["mlm_logits"], batch["mlm_labels"])
  if w["mim"]:
    num_kept = batch["image_keep"].shape[1]
    metrics["mim"] = mim_loss(out["mim_pred"], normalize_images(batch["image"]),
                              batch["image_restore"], num_kept, m.image.patch,
                              norm_pix=m.mim.norm_pix, unbiased_var=m.mim.target_var_unbiased)
  if w["global"]:
    metrics["global"] = global_alignment_loss(out["image_gla"][:, 0], out["text_gla"][:, 0],
                                              out["temperature_global"])
  if w["local"]:
    image_local, text_local = out["image_gla"][:, 1:], out["text_gla"]  # patches, all tokens
    if m.gla.local == "filip":
      i2t, t2i = gla.filip_similarity(image_local, text_local, batch["word_mask"], m.gla.chunk)
    elif m.gla.local == "attention":
      i2t, t2i = gla.attention_similarity(image_local, text_local, batch["word_mask"],
                                          m.gla.attention_temp, m.gla.agg_temp, m.gla.chunk)
    else:
      raise ValueError(f"model.gla.local must be 'filip' or 'attention', got {m.gla.local!r}")
    metrics["local"] = symmetric_info_nce(i2t / out["temperature_local"],
                                          t2i / out["temperature_local"])
  if w["itm"]:
    metrics["itm"], metrics["itm_acc"] = itm_loss(out["itm_logits"], out["itm_labels"])
  total = sum(w[k] * metrics[k] for k in LOSS_NAMES if w[k])
  metrics["loss"] = total
  metrics["temperature_global"] = out["temperature_global"]
  metrics["temperature_local"] = out["temperature_local"]
  return total, metrics
