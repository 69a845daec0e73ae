"""The MPMA pre-training loss and train step in PyTorch, equal to the JAX step in mpma_jax/train.py.

  losses       = losses.compute_losses: MIM (per-patch normalised pixels, masked patches only),
                 MLM (cross-entropy on chosen tokens), GLA global InfoNCE and local FILIP or
                 GLoRIA-style attention InfoNCE, weighted by config.loss. ITM is not ported: a
                 config with loss.itm > 0 is refused (the JAX ITM draws its negatives from a JAX
                 RNG stream that PyTorch cannot reproduce; every shipped variant has itm = 0).
  optimizer    = optim.make_optimizer: torch.optim.AdamW with the same four parameter groups
                 (encoders at optim.lr, the rest at lr * lr_mult; no weight decay on biases,
                 LayerNorm scales and temperatures), b1, b2, eps, the same warm-up + linear decay
                 schedule, and global-norm clipping when optim.grad_clip > 0.
  not ported   = the JAX step's non-finite guard (a check of the update and a lax.cond around
                 it) and its data counters.

`random_batch` builds one batch in the input pipeline's format (random pixels and token ids, real
MAE and BERT masks from mpma_jax.masking), shared by the JAX and PyTorch benchmarks.
"""
import os
from typing import Any, Callable, Optional

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F

from mpma_jax import losses, masking, optim
from mpma_jax.data import pipeline
from mpma_jax.interop import torch_mpma

IGNORE = masking.IGNORE
_NEG = -1e9  # as mpma_jax.models.gla: a finite -inf
NUM_SPECIAL = 5  # ids 0..4 are special tokens in random_batch (pad, cls, sep, mask, unk)


# --- batch ----------------------------------------------------------------------------------------
def special_ids(config: ml_collections.ConfigDict) -> dict:
  """pad (the model's pad_id), cls, sep and mask ids among 0..4, for synthetic batches."""
  pad = config.model.text.pad_id
  if not 0 <= pad < NUM_SPECIAL:
    raise ValueError(f"random_batch needs model.text.pad_id in [0, {NUM_SPECIAL}), got {pad}")
  cls, sep, mask = [i for i in range(NUM_SPECIAL) if i != pad][:3]
  return {"pad": pad, "cls": cls, "sep": sep, "mask": mask}


def random_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict:
  """One pre-training batch (NumPy, pipeline format): random uint8 images, texts of random
  length ([CLS] words [SEP], then padding), paired MAE / BERT masks from masking.paired_masks."""
  m = config.model
  length, vocab = config.data.max_len, m.text.vocab_size
  num_patches = (m.image.size // m.image.patch)**2
  if length < 5 or vocab <= NUM_SPECIAL + 1:
    raise ValueError(f"random_batch needs data.max_len >= 5 and vocab > {NUM_SPECIAL + 1}, "
                     f"got {length} and {vocab}")
  ids = special_ids(config)
  rng = np.random.default_rng(seed)
  batch = pipeline.dummy_batch(config, batch_size)
  batch["image"] = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
  random_ids = np.arange(NUM_SPECIAL, vocab, dtype=np.int32)
  for b in range(batch_size):
    n_words = int(rng.integers(3, length - 1))  # + [CLS] and [SEP] <= length
    text = np.full(length, ids["pad"], np.int32)  # [L]
    text[0], text[n_words + 1] = ids["cls"], ids["sep"]
    text[1:n_words + 1] = rng.choice(random_ids, n_words)
    word = np.zeros(length, np.int32)
    word[1:n_words + 1] = 1
    masks = masking.paired_masks(seed, 0, b, num_patches=num_patches,
                                 image_mask_ratio=config.masking.image_ratio, input_ids=text,
                                 candidate_mask=word.astype(bool),
                                 text_mask_ratio=config.masking.text_ratio, mask_id=ids["mask"],
                                 random_ids=random_ids, mask_prob=config.masking.mask_prob,
                                 random_prob=config.masking.random_prob)
    batch["text_ids"][b], batch["word_mask"][b] = text, word
    batch["text_mask"][b] = (np.arange(length) < n_words + 2).astype(np.int32)
    for k in ("image_keep", "image_restore", "mlm_ids", "mlm_labels"):
      batch[k][b] = masks[k]
  batch["index"] = np.arange(batch_size, dtype=np.int32)
  return batch


def to_torch(batch: dict, device: Any = "cpu") -> dict:
  return {k: torch.as_tensor(np.asarray(v), device=device) for k, v in batch.items()}


# --- losses (mpma_jax.losses, gla) ----------------------------------------------------------------
def patchify(images, patch: int):
  """images [B, H, W, C] -> [B, N, p*p*C], the same patch order as losses.patchify."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mim_loss(pred, images, restore, num_kept: int, patch: int, norm_pix: bool = True,
             eps: float = 1e-6, unbiased: bool = False):
  """MSE over masked patches; pred [B, N, p*p*3], images [B, H, W, 3] (normalised)."""
  target = patchify(images.float(), patch)  # [B, N, p*p*3]
  if norm_pix:
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, unbiased=unbiased, keepdim=True)
    target = (target - mean) / torch.sqrt(var + eps)
  per_patch = ((pred.float() - target)**2).mean(-1)  # [B, N]
  masked = restore >= num_kept  # [B, N]
  total = torch.where(masked, per_patch, torch.zeros_like(per_patch)).sum()
  return total / masked.sum().clamp(min=1).float()


def mlm_loss(logits, labels):
  """logits [B, L, V], labels [B, L] (IGNORE elsewhere) -> (mean CE, accuracy) on chosen."""
  logits = logits.float()
  valid = labels != IGNORE
  safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
  nll = -torch.gather(F.log_softmax(logits, -1), -1, safe[..., None])[..., 0]  # [B, L]
  count = valid.sum().clamp(min=1).float()
  loss = torch.where(valid, nll, torch.zeros_like(nll)).sum() / count
  acc = ((logits.argmax(-1) == safe) & valid).sum().float() / count
  return loss, acc


def info_nce(logits):
  """logits [B, B], positives on the diagonal -> mean cross-entropy over rows."""
  return -torch.diagonal(F.log_softmax(logits.float(), -1)).mean()


def symmetric_info_nce(i2t, t2i):
  return 0.5 * (info_nce(i2t) + info_nce(t2i))


def filip_similarity(image, text, word_mask, chunk: int):
  """image [Bi, P, G], text [Bt, L, G], word_mask [Bt, L] -> i2t [Bi, Bt], t2i [Bt, Bi]."""
  word_mask = word_mask.bool()
  has_words = word_mask.any(-1)  # [Bt]
  n_words = word_mask.sum(-1).clamp(min=1).float()  # [Bt]
  i2t, t2i = [], []
  for start in range(0, image.shape[0], chunk):  # [c, Bt, P, L] live, as the JAX lax.map
    sim = torch.einsum("ipg,tlg->itpl", image[start:start + chunk], text)
    best_word = sim.masked_fill(~word_mask[None, :, None, :], _NEG).amax(-1)  # [c, Bt, P]
    best_patch = sim.amax(2)  # [c, Bt, L]
    i2t.append(torch.where(has_words, best_word.mean(-1), torch.zeros_like(n_words)))
    t2i.append(torch.where(word_mask, best_patch, torch.zeros_like(best_patch)).sum(-1) / n_words)
  return torch.cat(i2t), torch.cat(t2i).T


def attention_similarity(image, text, word_mask, attention_temp: float, agg_temp: float,
                         chunk: int):
  """GLoRIA-style local similarity [Bi, Bt] and its transpose (gla.attention_similarity)."""
  word_mask = word_mask.bool()
  rows = []
  for start in range(0, image.shape[0], chunk):
    img = image[start:start + chunk]  # [c, P, G]
    sim = torch.einsum("ipg,tlg->itlp", img, text)  # [c, Bt, L, P]
    attn = torch.softmax(attention_temp * sim, -1)
    context = torch_mpma.l2_normalize(torch.einsum("itlp,ipg->itlg", attn, img))  # [c, Bt, L, G]
    score = (context * text).sum(-1)  # [c, Bt, L]
    score = torch.where(word_mask, agg_temp * score, torch.full_like(score, _NEG))
    lse = torch.logsumexp(score, -1) / agg_temp  # [c, Bt]
    rows.append(torch.where(word_mask.any(-1), lse, torch.zeros_like(lse)))
  sim = torch.cat(rows)
  return sim, sim.T


def compute_losses(out: dict, batch: dict, config: ml_collections.ConfigDict):
  """MPMATorch outputs + torch batch -> (weighted total, metrics), as losses.compute_losses."""
  w = losses.loss_weights(config)
  if w["itm"]:
    raise ValueError(f"loss.itm={w['itm']}: ITM is not ported to the PyTorch reference "
                     "(set --config.loss.itm=0)")
  m = config.model
  metrics = {}
  if w["mlm"]:
    metrics["mlm"], metrics["mlm_acc"] = mlm_loss(out["mlm_logits"], batch["mlm_labels"])
  if w["mim"]:
    metrics["mim"] = mim_loss(out["mim_pred"], torch_mpma.normalize_images(batch["image"]),
                              batch["image_restore"], batch["image_keep"].shape[1], m.image.patch,
                              m.mim.norm_pix, unbiased=m.mim.target_var_unbiased)
  if w["global"]:
    image, text = out["image_gla"][:, 0].float(), out["text_gla"][:, 0].float()
    logits = image @ text.T / out["temperature_global"]  # [B, B]
    metrics["global"] = symmetric_info_nce(logits, logits.T)
  if w["local"]:
    image_local, text_local = out["image_gla"][:, 1:].float(), out["text_gla"].float()
    if m.gla.local == "filip":
      i2t, t2i = filip_similarity(image_local, text_local, batch["word_mask"], m.gla.chunk)
    elif m.gla.local == "attention":
      i2t, t2i = attention_similarity(image_local, text_local, batch["word_mask"],
                                      m.gla.attention_temp, m.gla.agg_temp, m.gla.chunk)
    else:
      raise ValueError(f"model.gla.local must be 'filip' or 'attention', got {m.gla.local!r}")
    t = out["temperature_local"]
    metrics["local"] = symmetric_info_nce(i2t / t, t2i / t)
  total = sum(w[k] * metrics[k] for k in losses.LOSS_NAMES if w[k])
  metrics["loss"] = total
  return total, metrics


# --- optimizer (mpma_jax.optim) -------------------------------------------------------------------
def schedule_factor(config: ml_collections.ConfigDict, step: int) -> float:
  """optim.schedule(config.optim, config.train.steps, 1.0)(step) in plain Python: linear warm-up, then linear decay to 0."""
  steps = config.train.steps
  warmup = int(round(config.optim.warmup * steps))
  if step < warmup:
    return min(step, max(warmup, 1)) / max(warmup, 1)
  decay = max(steps - warmup, 1)
  return 1.0 - min(step - warmup, decay) / decay


def param_groups(config: ml_collections.ConfigDict, model: torch.nn.Module) -> list[dict]:
  """AdamW groups as optim.make_optimizer: (encoder | new) x (decay | no decay), chosen from each
  parameter's JAX path (top-level module, leaf name)."""
  o = config.optim
  layout = torch_mpma._jax_layout(model)  # torch name -> (JAX path, kind, shape)
  groups = {}
  for name, p in model.named_parameters():
    path = layout[name][0].split("/")
    encoder = path[0] in set(o.encoder_modules)
    decay = path[-1] not in optim.NO_DECAY_LEAVES
    key = ("encoder" if encoder else "new", decay)
    groups.setdefault(
        key, {
            "params": [], "names": [], "lr": o.lr * (1.0 if encoder else o.lr_mult),
            "weight_decay": o.weight_decay if decay else 0.0
        })
    groups[key]["params"].append(p)
    groups[key]["names"].append(name)
  return [groups[k] for k in sorted(groups)]


def make_optimizer(config: ml_collections.ConfigDict, model: torch.nn.Module,
                   impl: str = "foreach"):
  """(torch.optim.AdamW, LambdaLR with the config's schedule). impl: foreach | fused | for."""
  o = config.optim
  kw = {"foreach": impl == "foreach", "fused": True if impl == "fused" else None}
  opt = torch.optim.AdamW(param_groups(config, model), betas=(o.b1, o.b2), eps=o.eps, **kw)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule_factor(config, s))
  return opt, sched


# --- the step -------------------------------------------------------------------------------------
def make_torch_step(config: ml_collections.ConfigDict, model: torch_mpma.MPMATorch,
                    compile: bool = False, optimizer: str = "foreach",
                    compile_mode: Optional[str] = None,
                    amp: bool = False) -> Callable[[dict], dict]:
  """step(batch of torch tensors) -> metrics (0-d tensors): forward, losses, backward, global
  gradient norm (+ clipping), AdamW update and schedule step; `model` is updated in place.

  compile: torch.compile the forward pass and losses (the backward is compiled with them by
  AOTAutograd); the optimizer runs its foreach / fused kernels either way.
  amp: bfloat16 autocast of the forward pass on the model's device (the usual PyTorch mixed
  precision; parameters, gradients and optimizer state stay float32, the losses cast to float32).
  """
  model.train()
  params = list(model.parameters())
  for p in params:  # zero, not None: unused parameters still get weight decay, as in optax
    p.grad = torch.zeros_like(p)
  opt, sched = make_optimizer(config, model, optimizer)
  clip = config.optim.grad_clip

  device_type = next(model.parameters()).device.type

  def loss_fn(batch):
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
      out = model(batch)
    return compute_losses(out, batch, config)

  if compile:
    loss_fn = torch.compile(loss_fn, mode=compile_mode)

  def step(batch: dict) -> dict:
    opt.zero_grad(set_to_none=False)
    total, metrics = loss_fn(batch)
    total.backward()
    norms = torch._foreach_norm([p.grad for p in params])  # pylint: disable=protected-access
    grad_norm = torch.linalg.vector_norm(torch.stack(norms))
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    opt.step()
    sched.step()
    metrics = {k: v.detach() for k, v in metrics.items()}
    metrics["grad_norm"] = grad_norm
    return metrics

  step.optimizer, step.scheduler = opt, sched
  return step


def synchronize(device: Any) -> None:
  """Wait for queued device work (a no-op on the CPU, where PyTorch runs synchronously)."""
  if torch.device(device).type == "cuda":
    torch.cuda.synchronize()


def num_threads() -> int:
  """CPU cores this process may use."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1
