"""AdamW with M3AE's parameter groups and schedule (method.md §5).

Groups: the encoders (config.optim.encoder_modules) train at optim.lr; every other top-level module
(projections, memory, fusion, poolers, GLA, heads) at optim.lr * optim.lr_mult. Biases, LayerNorm
scales and the temperatures get no weight decay. Schedule: linear warm-up over optim.warmup of the
steps, then linear decay to 0.
"""
from typing import Any

import jax
import ml_collections
import optax

NO_DECAY_LEAVES = ("bias", "scale", "log_temperature_global", "log_temperature_local")


def _names(path) -> list[str]:
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def param_groups(params: Any, encoder_modules) -> Any:
  """Tree of 'encoder' | 'new' labels, by the parameter's top-level module name."""
  encoder_modules = set(encoder_modules)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "encoder" if _names(path)[0] in encoder_modules else "new", params)


def decay_mask(params: Any) -> Any:
  """Tree of bools: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _names(path)[-1] not in NO_DECAY_LEAVES, params)


def schedule(config: ml_collections.ConfigDict, peak_lr: float) -> optax.Schedule:
  steps = config.train.steps
  warmup = int(round(config.optim.warmup * steps))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_lr, max(warmup, 1)),
       optax.linear_schedule(peak_lr, 0.0, max(steps - warmup, 1))], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim

  def adamw(peak_lr):
    return optax.adamw(schedule(config, peak_lr), b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=o.weight_decay, mask=decay_mask)

  tx = optax.multi_transform(
      {"encoder": adamw(o.lr), "new": adamw(o.lr * o.lr_mult)},
      lambda params: param_groups(params, o.encoder_modules))
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx
