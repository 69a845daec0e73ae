"""The analytic FLOP count against XLA's own count of the compiled forward pass, its breakdown,
the device peak table and the throughput arithmetic."""
import math
import re

import flax.linen as nn
import jax
import pytest

from mpma_jax import flops, losses, masking, train
from mpma_jax.data import pipeline
from mpma_jax.models.mpma import MPMA
from tests.conftest import tiny_config

B = 8


def wide_config(width: int = 128):
  """tiny_config() widened so that matmuls dominate: 64 patches (16 kept), 32 text tokens."""
  c = tiny_config()
  m = c.model
  m.hidden = width
  m.image.update(size=64, patch=8, width=width, layers=1, heads=2)
  m.text.update(vocab_size=512, width=width, layers=1, heads=2, mlp_dim=4 * width)
  m.fusion.update(layers=2, heads=2, mlp_dim=4 * width)
  m.memory.update(slots=64, topk=8, heads=2)
  # chunk >= B: the local similarity runs as one step. XLA's cost analysis counts the body of a
  # while loop once, whatever its trip count, so with more steps it would undercount GLA local.
  m.gla.update(dim=64, chunk=B)
  m.mim.update(layer=1, width=width // 2, depth=1, heads=2)
  c.data.max_len = 32
  return c


def _variant(name):
  """Three configs that between them cover both gla.features_from, memory on / off, both memory
  placements and implementations, both local similarities, ITM, and a live last image layer."""
  c = wide_config(256 if name == "masked_no_memory_256" else 128)
  m = c.model
  if name == "masked_no_memory_256":
    m.gla.features_from = "masked"
    m.memory.enabled = False
    m.mim.layer = m.fusion.layers  # the last image layer feeds the decoder, so it is live
  elif name == "every_layer_gather_itm":
    m.memory.update(placement="every_text_layer", impl="gather")
    m.gla.local = "attention"
    c.loss.itm = 1.0
  return c


def _compiled_forward(config):
  """The jitted forward pass + losses (as in the train step), compiled for a batch of B."""
  model = MPMA.from_config(config)
  params = nn.meta.unbox(
      jax.eval_shape(lambda: train.init_params(config, model, jax.random.key(0))))  # shapes only
  with_itm = config.loss.itm > 0

  def loss(p, batch):
    out = model.apply({"params": p}, batch, with_itm=with_itm, rngs={"itm": jax.random.key(0)})
    return losses.compute_losses(out, batch, config)[0]

  return jax.jit(loss).lower(params, pipeline.dummy_batch(config, B)).compile()


def _shape(text):
  return [int(s) for s in re.match(r"\w+\[([\d,]*)\]", text).group(1).split(",") if s]


def _matmul_flops(hlo: str) -> float:
  """2 * output elements * contracted size, summed over the dot and convolution ops of an HLO
  module (every computation is reached once here: no while loops)."""
  name = r"%[\w.\-]+"
  shapes = {}
  for line in hlo.splitlines():
    if m := re.match(rf"\s*(?:ROOT )?({name}) = (\w+\[[\d,]*\])", line):
      shapes[m.group(1)] = _shape(m.group(2))
  total = 0.0
  for line in hlo.splitlines():
    m = re.match(rf"\s*(?:ROOT )?{name} = (\w+\[[\d,]*\])\S* (dot|convolution)\(({name}), ({name})",
                 line)
    if not m:
      continue
    out, lhs, rhs = _shape(m.group(1)), shapes[m.group(3)], shapes[m.group(4)]
    if m.group(2) == "dot":
      dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
      contracted = math.prod(lhs[int(i)] for i in dims.split(",") if i)
    else:  # the kernel's size over its output-feature dimension
      labels = re.search(r"dim_labels=\w+_(\w+)->", line).group(1)
      contracted = math.prod(rhs) // rhs[labels.index("o")]
    total += 2.0 * math.prod(out) * contracted
  return total


@pytest.mark.parametrize("variant", [
    "clean_memory",
    pytest.param("masked_no_memory_256", marks=pytest.mark.slow),
    pytest.param("every_layer_gather_itm", marks=pytest.mark.slow),
])
def test_forward_flops_match_xla(variant):
  config = _variant(variant)
  compiled = _compiled_forward(config)
  analytic = flops.forward_flops(config, B)["total"]

  # Exact: the dot and convolution FLOPs of the optimised module are the analytic count (this
  # checks the formulas, including what XLA merges or drops: the patch embedding and memory slot
  # projections computed once, the dead last image-stream fusion layer).
  matmuls = _matmul_flops(compiled.as_text())
  assert matmuls > 0, "no dot/convolution found: has the HLO text format changed?"
  assert analytic == pytest.approx(matmuls, rel=1e-6)

  # XLA's cost analysis also counts elementwise ops (LayerNorm, softmax, erf-GELU expanded into a
  # polynomial on CPU, ...), about 3-7% of its total at widths 128-256 (measured: 0.932-0.971).
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a dict in jax 0.10
  ratio = analytic / cost["flops"]
  assert 0.90 <= ratio <= 1.0, f"analytic / XLA = {ratio:.4f}"


def test_breakdown_follows_the_config():
  c = wide_config()
  n = (c.model.image.size // c.model.image.patch)**2
  n_keep = masking.num_kept_patches(n, c.masking.image_ratio)
  clean = flops.forward_flops(c, B)

  c.model.gla.features_from = "masked"
  masked = flops.forward_flops(c, B)
  clean_pass = {"image_encoder_clean", "text_encoder_clean", "projections_clean"}
  assert set(clean) - set(masked) == clean_pass and set(masked) <= set(clean)
  for key in set(masked) - {"gla_heads", "gla_local", "total"}:
    assert masked[key] == clean[key], key
  assert masked["gla_local"] == clean["gla_local"] * n_keep / n  # FILIP over the kept patches
  assert masked["gla_heads"] < clean["gla_heads"]

  c.model.memory.enabled = False
  assert flops.forward_flops(c, B)["memory"] == 0
  c.model.memory.enabled = True
  c.model.memory.placement = "every_text_layer"  # K text reads instead of one
  every = flops.forward_flops(c, B)
  d, length, s = c.model.hidden, c.data.max_len, c.model.memory.slots
  text_read = 2 * 2 * B * length * d * d + 2 * 2 * B * length * s * d
  assert every["memory"] - masked["memory"] == (c.model.fusion.layers - 1) * text_read

  assert "itm" not in clean
  c.loss.itm = 1.0
  assert flops.forward_flops(c, B)["itm"] > 0

  # The contrastive similarities are quadratic in the (global) batch, the rest linear.
  double = flops.forward_flops(wide_config(), 2 * B)
  assert double["gla_local"] == 4 * clean["gla_local"]
  assert double["gla_global"] == 4 * clean["gla_global"]
  assert double["fusion"] == 2 * clean["fusion"]
  assert all(v >= 0 for v in clean.values())
  assert clean["total"] == sum(v for k, v in clean.items() if k != "total")


def test_train_step_is_three_forwards():
  c = wide_config()
  assert flops.train_step_flops(c, B) == 3 * flops.forward_flops(c, B)["total"]
  # Gradient accumulation: a forward passes on micro-batches; the contrastive terms shrink.
  c.train.grad_accum = 2
  half = flops.forward_flops(c, B // 2)
  assert flops.train_step_flops(c, B) == 3 * 2 * half["total"]
  assert flops.train_step_flops(c, B) < 3 * flops.forward_flops(c, B)["total"]
  c.train.grad_accum = 3
  with pytest.raises(ValueError, match="grad_accum"):
    flops.train_step_flops(c, B)


class _FakeDevice:
  device_kind = "NVIDIA H100 80GB HBM3"


def test_peak_flops():
  assert flops.peak_flops("TPU v4", "bfloat16") == 275e12
  assert flops.peak_flops("TPU v5 lite", "float32") == 197e12  # one bf16 pass by default
  assert flops.peak_flops(_FakeDevice(), "bfloat16") == pytest.approx(989.4e12)
  assert flops.peak_flops(_FakeDevice(), "float32") == pytest.approx(494.7e12)  # TF32
  assert flops.peak_flops(_FakeDevice(), "bfloat16", override_tflops=100.0) == 100e12
  assert flops.peak_flops(jax.devices("cpu")[0], "float32") is None
  assert flops.peak_flops(jax.devices("cpu")[0], "float32", override_tflops=1.5) == 1.5e12
  with pytest.raises(ValueError, match="dtype"):
    flops.peak_flops("TPU v4", "float16")


def test_throughput():
  # 8 PFLOP per step in 2 s on 8 devices = 500 TFLOP/s each; half of a 1000 TFLOP/s peak.
  out = flops.throughput(8e15, 2.0, 8, 1e15)
  assert out["tflops_per_device"] == pytest.approx(500.0)
  assert out["mfu"] == pytest.approx(0.5)
  assert flops.throughput(8e15, 2.0, 8, None) == {"tflops_per_device": pytest.approx(500.0)}


def test_unpaired_masking_adds_the_mlm_pass_and_itm_reads_unmasked_features():
  config = tiny_config()
  config.model.gla.features_from = "masked"
  config.loss.itm = 1.0
  b, m = 4, config.model
  n_all = (m.image.size // m.image.patch)**2
  paired = flops.forward_flops(config, b)
  # ITM fuses the unmasked image, so its encoder pass is counted even with masked GLA features.
  assert paired["image_encoder_clean"] > 0
  assert paired["itm"] > flops._fusion(
      b,
      1 + n_all,
      config.data.max_len,
      config,  # pylint: disable=protected-access
      last_image_layer=True)
  config.masking.paired = False
  unpaired = flops.forward_flops(config, b)
  mlm_pass = flops._fusion(b, 1 + n_all, config.data.max_len, config, last_image_layer=False)  # pylint: disable=protected-access
  assert unpaired["fusion"] - paired["fusion"] == pytest.approx(mlm_pass)
  assert unpaired["memory"] > paired["memory"]
