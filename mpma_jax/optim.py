"""AdamW with M3AE's parameter groups and schedule (docs/method.md §5).

Groups: the encoders (config.optim.encoder_modules) train at optim.lr; every other top-level module
(projections, memory, fusion, poolers, GLA, heads) at optim.lr * optim.lr_mult. Biases, LayerNorm
scales and the temperatures get no weight decay. Schedule: linear warm-up over optim.warmup of the
steps, then linear decay to 0.
"""
from typing import Any, Callable, Mapping, Optional

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
  return jax.tree_util.tree_map_with_path(lambda path, _: _names(path)[-1] not in NO_DECAY_LEAVES,
                                          params)


def schedule(optim_config: ml_collections.ConfigDict, steps: int, peak_lr: float) -> optax.Schedule:
  """Linear warm-up over optim.warmup of `steps` to peak_lr, then linear decay to 0."""
  warmup = int(round(optim_config.warmup * steps))
  return optax.join_schedules([
      optax.linear_schedule(0.0, peak_lr, max(warmup, 1)),
      optax.linear_schedule(peak_lr, 0.0, max(steps - warmup, 1))
  ], [warmup])


def adamw(optim_config: ml_collections.ConfigDict, steps: int, groups: Callable[[Any], Any],
          lr_mults: Mapping[str, Optional[float]]) -> optax.GradientTransformation:
  """AdamW for pre-training and fine-tuning alike: `groups(params)` labels every leaf, and a group
  trains at optim.lr * lr_mults[group] on `schedule`, or not at all where the multiplier is None;
  no weight decay on NO_DECAY_LEAVES; global-norm clipping at optim.grad_clip (> 0)."""
  o = optim_config

  def group(mult):
    if mult is None:
      return optax.set_to_zero()
    return optax.adamw(schedule(o, steps, o.lr * mult), b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=o.weight_decay, mask=decay_mask)

  tx = optax.multi_transform({name: group(mult) for name, mult in lr_mults.items()}, groups)
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Pre-training: the encoders at optim.lr, every other module at optim.lr * optim.lr_mult."""
  o = config.optim
  return adamw(o, config.train.steps, lambda params: param_groups(params, o.encoder_modules),
               {"encoder": 1.0, "new": o.lr_mult})
