"""benchmarks/scaling.py: the paper model's formulas on small configs (no train-step compile)."""
import jax
import pytest

from benchmarks import memory_fit as memory
from benchmarks import scaling
from tests.conftest import tiny_config

# A made-up machine with small fast domains, so that hierarchical collectives show up at N = 8.
HW = scaling.Hardware("test", "TPU v5e", 100.0, 16.0, 4, "fast", 100.0, 1.0, "slow", 10.0, 5.0)


def _inputs(config):
  return scaling.Inputs(config, scaling.param_leaves(config),
                        dict(scaling.sharding.rules(config.mesh)), fit=(1e9, 1e8))


@pytest.mark.parametrize("variant", ["default", "no_memory", "every_layer_attention"])
def test_analytic_param_count_equals_eval_shape(variant):
  config = tiny_config()
  if variant == "no_memory":
    config.model.memory.enabled = False
  elif variant == "every_layer_attention":
    config.model.memory.placement = "every_text_layer"
    config.model.gla.local = "attention"
    config.model.mim.layer = config.model.fusion.layers
  real = {}
  for x in scaling.param_leaves(config):
    real[x.component] = real.get(x.component, 0) + x.size
  assert scaling.analytic_param_counts(config) == real


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("fsdp", [2, 8])
def test_state_bytes_per_device_match_the_compiled_shardings(fsdp):
  config = tiny_config()
  inputs = _inputs(config)
  state = scaling.state_per_device(inputs.leaves, inputs.rules, 8 // fsdp, fsdp)
  measured = memory.measure(config, fsdp, 8, compile_step=False)
  assert state["params"] == measured["params_bytes"]
  assert 0 <= measured["opt_bytes"] - state["adamw"] <= 64  # + Adam's step counters

  # FSDP = total / N, up to the tensors not split over fsdp (biases, temperatures).
  split = sum(
      x.size * x.itemsize for x in inputs.leaves if scaling.split_over(x, inputs.rules, "fsdp"))
  replicated = inputs.param_bytes - split
  assert state["params"] == split // fsdp + replicated
  assert replicated < 0.02 * inputs.param_bytes


def test_uneven_split_pads_to_ceil():
  leaf = scaling.Leaf("x/kernel", (384, 10), 4, ("embed", None))
  rules = {"embed": "fsdp"}
  assert scaling.shard_bytes(leaf, rules, {"data": 1, "fsdp": 128, "tensor": 1}) == 3 * 10 * 4
  assert scaling.shard_bytes(leaf, rules, {"data": 1, "fsdp": 256, "tensor": 1}) == 2 * 10 * 4


@pytest.mark.parametrize("n", [2, 4, 8, 64, 1024])
def test_collective_bytes_per_device(n):
  size = 1e9
  for op, passes in (("all-gather", 1), ("reduce-scatter", 1), ("all-reduce", 2)):
    flat = scaling.collective(HW, op, size, n, n, 1.0)  # one fast domain of n (no slow link)
    assert flat.slow_bytes == 0
    assert flat.fast_bytes == pytest.approx(passes * (n - 1) / n * size)
    # Hierarchical (fast domains of 4): the same total, 1/inner of it across domains.
    tiered = scaling.collective(HW, op, size, n, min(n, HW.domain), 1.0)
    assert tiered.fast_bytes + tiered.slow_bytes == pytest.approx(passes * (n - 1) / n * size)
    if n > HW.domain:
      outer = n // HW.domain
      assert tiered.slow_bytes == pytest.approx(passes * (outer - 1) / outer * size / HW.domain)


def test_dp_all_reduce_and_fsdp_bytes_scale_with_n():
  config = tiny_config()
  inputs = _inputs(config)
  p = inputs.param_bytes
  split = sum(
      x.size * x.itemsize for x in inputs.leaves if scaling.split_over(x, inputs.rules, "fsdp"))
  dp, fsdp = [], []
  for n in (2, 4, 8, 64, 1024):
    t = scaling.step_traffic(inputs.leaves, inputs.rules, config, HW, n, 1, n)["params"]
    dp.append(t.fast_bytes + t.slow_bytes)
    assert dp[-1] == pytest.approx(2 * (n - 1) / n * p)  # ring all-reduce of the gradients
    t = scaling.step_traffic(inputs.leaves, inputs.rules, config, HW, 1, n, n)["params"]
    fsdp.append(t.fast_bytes + t.slow_bytes)
    # all-gather + reduce-scatter of the split tensors, all-reduce of the replicated ones
    assert fsdp[-1] == pytest.approx(2 * (n - 1) / n * p)
    gather_only = scaling.step_traffic(inputs.leaves, inputs.rules, config, HW, 1, n, n,
                                       regather=True)["params"]
    regathered = gather_only.fast_bytes + gather_only.slow_bytes - fsdp[-1]
    assert regathered == pytest.approx((n - 1) / n * split)  # one more all-gather
  # Per-device traffic tends to a constant (2 x parameter bytes): the all-gather to the full
  # parameter bytes, while the per-device state falls as 1/N.
  assert dp == sorted(dp) and dp[-1] / (2 * p) > 0.999
  assert fsdp[-1] / (2 * p) > 0.999
  states = [
      scaling.state_per_device(inputs.leaves, inputs.rules, 1, n)["params"] for n in (1, 2, 4, 8)
  ]
  assert states == sorted(states, reverse=True)


def test_hybrid_all_reduces_only_the_gradient_shard_over_data():
  config = tiny_config()
  inputs = _inputs(config)
  d, f = 4, 2
  split = sum(
      x.size * x.itemsize for x in inputs.leaves if scaling.split_over(x, inputs.rules, "fsdp"))
  replicated = inputs.param_bytes - split
  t = scaling.step_traffic(inputs.leaves, inputs.rules, config, HW, d, f, 8)["params"]
  want = (2 * (f - 1) / f * split + 2 * (d - 1) / d * split / f + 2 * (d * f - 1) /
          (d * f) * replicated)
  assert t.fast_bytes + t.slow_bytes == pytest.approx(want)


def test_contrastive_and_topk_bytes_from_the_config():
  config = tiny_config()
  m = config.model
  patches = (m.image.size // m.image.patch)**2
  keep = scaling.masking.num_kept_patches(patches, config.masking.image_ratio)
  length = config.data.max_len
  assert scaling.gla_gather_bytes(config, 16) == 16 * (1 + patches + length) * m.gla.dim * 4
  assert scaling.topk_gather_bytes(
      config, 16) == 16 * m.memory.heads * (1 + keep + length) * m.memory.slots * 4
  # GLA: an all-gather forward and a reduce-scatter backward over all N devices.
  for n in (2, 8):
    t = scaling.step_traffic(scaling.param_leaves(config),
                             dict(scaling.sharding.rules(config.mesh)), config, HW, n, 1, 32)["gla"]
    assert t.fast_bytes + t.slow_bytes == pytest.approx(2 * (n - 1) / n *
                                                        scaling.gla_gather_bytes(config, 32))
  config.model.memory.enabled = False
  assert scaling.topk_gather_bytes(config, 16) == 0


def test_step_row_compute_memory_and_linear_fit():
  config = tiny_config()
  inputs = _inputs(config)
  row = scaling.step_row(inputs, HW, 2, 4, 32)
  assert row["per_dev"] == 4
  assert row["tflop"] * 1e12 == pytest.approx(scaling.flops.train_step_flops(config, 32) / 8)
  assert row["compute_ms"] == pytest.approx(row["tflop"] / (HW.peak_tflops * 0.45) * 1e3)
  assert row["mem_asis_gib"] > row["mem_gib"] > 0
  a, b = scaling.linear_fit({2: 10 + 2 * 3, 4: 10 + 4 * 3, 8: 10 + 8 * 3})
  assert (a, b) == (pytest.approx(10), pytest.approx(3))
  assert scaling.block_input_bytes(config) > 0
