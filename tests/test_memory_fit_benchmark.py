"""benchmarks/memory_fit.py: per-device state bytes under FSDP, on a small config (no compile)."""
import math

import flax.linen as nn
import jax
import pytest

from benchmarks import memory_fit as memory
from mpma_jax import train
from mpma_jax.models.mpma import MPMA
from tests.conftest import tiny_config


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_fsdp8_state_bytes_are_an_eighth_up_to_the_unsplit_parameters():
  config = tiny_config()
  one = memory.measure(config, 1, 8, compile_step=False)
  eight = memory.measure(config, 8, 8, compile_step=False)
  assert (one["data"], eight["data"]) == (8, 1)
  assert one["params_bytes"] == one["params_global_bytes"]  # data parallel: all replicated

  # Independently, from the logical names: 'embed' is the one logical axis the rules map to fsdp.
  rules = dict(config.mesh.rules)
  assert [name for name, axes in rules.items() if axes == "fsdp"] == ["embed"]
  model = MPMA.from_config(config)
  boxed = jax.eval_shape(lambda: train.init_params(config, model, jax.random.key(0)))
  names = jax.tree.leaves(nn.get_partition_spec(boxed),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.tree.leaves(nn.meta.unbox(boxed))
  want = sum(
      math.prod(x.shape) * x.dtype.itemsize // (8 if "embed" in spec else 1)
      for spec, x in zip(names, shapes))
  assert eight["params_bytes"] == want

  # Adam keeps two moments per parameter (plus a few step counters).
  for r in (one, eight):
    assert 0 <= r["opt_bytes"] - 2 * r["params_bytes"] <= 64
  ratio = (eight["params_bytes"] + eight["opt_bytes"]) / (one["params_bytes"] + one["opt_bytes"])
  assert 0.125 <= ratio <= memory.TARGET
