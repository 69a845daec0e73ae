"""One check of a whole pre-training config, before anything is generated, trained, compiled or
written: each problem is one line naming the field, its value and what is expected. And the check
that a resumed run's config still fits its checkpoints."""
from typing import Any, Optional

import ml_collections

from mpma_jax import sharding
from mpma_jax.data import pipeline
from mpma_jax.models import layers, text


class UsageError(ValueError):
  """The command's input (config, workdir, data, flags) cannot work; found before any work is done
  and before anything is written. The commands print it as one line and exit with status 2."""


DTYPES = ("float32", "bfloat16")
CHOICES = {  # field -> allowed values
    "model.dtype": DTYPES,
    "model.remat": tuple(layers.REMAT_POLICIES),
    "model.text.position_style": ("bert", "roberta"),
    "model.memory.placement": ("pre_fusion", "every_text_layer"),
    "model.memory.impl": ("masked", "gather"),
    "model.gla.local": ("filip", "attention"),
    "model.gla.features_from": ("clean", "masked"),
    "model.mim.activation": ("gelu", "quick_gelu"),
    "model.image.pos_resize": ("torch_bicubic", "jax_bicubic"),
    "data.text_choice": ("random", "first", "concat"),
    "train.nonfinite": ("skip", "stop"),
}
POSITIVE = ("model.hidden", "model.image.size", "model.image.patch", "model.image.width",
            "model.image.layers", "model.image.heads", "model.text.vocab_size", "model.text.width",
            "model.text.layers", "model.text.heads", "model.text.mlp_dim",
            "model.text.max_positions", "model.fusion.layers", "model.fusion.heads",
            "model.fusion.mlp_dim", "model.memory.slots", "model.memory.topk", "model.memory.heads",
            "model.gla.dim", "model.gla.chunk", "model.mim.layer", "model.mim.width",
            "model.mim.depth", "model.mim.heads", "data.max_len", "data.tokenizer_vocab",
            "train.steps", "train.batch_size", "train.log_every", "train.grad_accum",
            "train.ckpt_every", "train.keep_checkpoints", "eval.num_pairs", "eval.batch_size")
NON_NEGATIVE = ("train.max_nonfinite_consecutive", "train.max_nonfinite_total", "train.run_steps",
                "train.peak_tflops", "optim.lr", "optim.weight_decay", "optim.grad_clip",
                "loss.mlm", "loss.mim", "loss.global_", "loss.local", "loss.itm", "data.workers")
# (field, field it must divide or be divisible by)
DIVIDES = (("model.image.heads", "model.image.width"), ("model.text.heads", "model.text.width"),
           ("model.fusion.heads", "model.hidden"), ("model.memory.heads", "model.hidden"),
           ("model.mim.heads", "model.mim.width"), ("model.image.patch", "model.image.size"),
           ("train.grad_accum", "train.batch_size"))
# Fields a resumed run may change: how long and how it runs, not what the checkpoint holds.
RESUMABLE = ("train.steps", "train.run_steps", "train.log_every", "train.ckpt_every",
             "train.keep_checkpoints", "train.ckpt_async", "train.ckpt_fallback", "train.nonfinite",
             "train.max_nonfinite_consecutive", "train.max_nonfinite_total", "train.peak_tflops",
             "train.grad_accum", "data.workers", "data.prefetch", "data.read_threads",
             "data.read_buffer", "data.data_dir", "eval.batch_size", "eval.pictures", "mesh.",
             "init.", "model.remat", "model.dtype", "model.gla.chunk", "model.memory.impl")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def problems(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> list[str]:
  """Every problem of the config, one line each (empty: the config is fine). num_devices: the
  devices the mesh must fit (None: not checked)."""
  out = []

  def bad(field, why):
    out.append(f"{field}={_get(config, field)!r}: {why}")

  for field, allowed in CHOICES.items():
    if _get(config, field) not in allowed:
      bad(field, f"expected one of {', '.join(map(repr, allowed))}")
  for field in POSITIVE:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
      bad(field, "expected a positive number")
  for field in NON_NEGATIVE:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      bad(field, "expected a number >= 0")
  if out:  # the relations below assume sane numbers
    return out
  for small, big in DIVIDES:
    if _get(config, big) % _get(config, small):
      bad(big, f"must be divisible by {small}={_get(config, small)}")
  m = config.model
  for field in ("masking.image_ratio", "masking.text_ratio"):
    if not 0 <= _get(config, field) < 1:
      bad(field, "expected a fraction in [0, 1)")
  if not 0 <= config.masking.mask_prob + config.masking.random_prob <= 1:
    bad("masking.random_prob", "masking.mask_prob + masking.random_prob must be <= 1")
  if not 0 <= config.optim.warmup <= 1:
    bad("optim.warmup", "expected a fraction of the steps in [0, 1]")
  if m.mim.layer > m.fusion.layers:
    bad("model.mim.layer", f"expected a fusion layer, 1..model.fusion.layers={m.fusion.layers}")
  longest = text.longest_text(m.text.max_positions, m.text.position_style, m.text.pad_id)
  if config.data.max_len > longest:
    bad(
        "data.max_len", f"longer than the text encoder reads: model.text.max_positions="
        f"{m.text.max_positions} ({m.text.position_style} positions) takes at most {longest} tokens"
    )
  if m.memory.topk > m.memory.slots:
    bad("model.memory.topk", f"expected at most model.memory.slots={m.memory.slots}")
  if m.memory.placement == "every_text_layer" and m.scan:
    bad("model.memory.placement", "'every_text_layer' needs model.scan=False")
  if config.loss.mlm + config.loss.mim + config.loss.global_ + config.loss.local + \
      config.loss.itm <= 0:
    bad("loss.mlm", "every loss weight is 0: nothing to train")
  try:
    pipeline.parse_mixture(config.data.name)
  except ValueError as e:
    out.append(str(e))
  if num_devices is not None:
    try:
      data, fsdp, _ = sharding.mesh_shape(config.mesh, num_devices)
    except ValueError as e:
      out.append(f"mesh: {e}")
    else:
      micro = config.train.batch_size // config.train.grad_accum
      if not config.train.batch_size % config.train.grad_accum and micro % (data * fsdp):
        bad(
            "train.batch_size", f"the micro-batch (train.batch_size / train.grad_accum = "
            f"{micro}) must be divisible by the {data * fsdp} data x fsdp devices")
  return out


def check(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """UsageError listing every problem, or nothing."""
  found = problems(config, num_devices)
  if found:
    raise UsageError("invalid config: " + "; ".join(found))


def _flat(config: ml_collections.ConfigDict) -> dict:
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, (ml_collections.ConfigDict, dict)):
        walk(v, f"{prefix}{k}.")
      else:
        out[prefix + k] = tuple(v) if isinstance(v, list) else v

  walk(config, "")
  return out


def resume_differences(saved: ml_collections.ConfigDict,
                       current: ml_collections.ConfigDict) -> list[str]:
  """The fields a resumed run changes although its checkpoints depend on them ('field: saved ->
  now'), e.g. a model width or the dataset."""
  old, new = _flat(saved), _flat(current)
  out = []
  for key in sorted(set(old) | set(new)):
    if key.startswith(RESUMABLE) or key == "format_version":
      continue
    if old.get(key, "(absent)") != new.get(key, "(absent)"):
      out.append(f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
  return out
