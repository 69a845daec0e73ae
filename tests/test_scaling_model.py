"""benchmarks/scaling_model.py: the paper model's formulas on small configs (no train-step
compile); benchmarks/scaling.py: the tables it writes between the markers of
docs/scaling_model.md, and nothing else."""
import os
import re
import shutil

import jax
import pytest

from benchmarks import memory_fit as memory
from benchmarks import scaling, scaling_model
from mpma_jax import flops, masking, sharding
from tests.conftest import ROOT, tiny_config

# A made-up machine with small fast domains, so that hierarchical collectives show up at N = 8.
HW = scaling_model.Hardware("test", "TPU v5e", 100.0, 16.0, 4, "fast", 100.0, 1.0, "slow", 10.0,
                            5.0)


def _inputs(config):
  return scaling_model.Inputs(config, scaling_model.param_leaves(config),
                              dict(sharding.rules(config.mesh)), fit=(1e9, 1e8))


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
  for x in scaling_model.param_leaves(config):
    real[x.component] = real.get(x.component, 0) + x.size
  assert scaling_model.analytic_param_counts(config) == real


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("fsdp", [2, 8])
def test_state_bytes_per_device_match_the_compiled_shardings(fsdp):
  config = tiny_config()
  inputs = _inputs(config)
  state = scaling_model.state_per_device(inputs.leaves, inputs.rules, 8 // fsdp, fsdp)
  measured = memory.measure(config, fsdp, 8, compile_step=False)
  assert state["params"] == measured["params_bytes"]
  assert 0 <= measured["opt_bytes"] - state["adamw"] <= 64  # + Adam's step counters

  # FSDP = total / N, up to the tensors not split over fsdp (biases, temperatures).
  split = sum(x.size * x.itemsize for x in inputs.leaves
              if scaling_model.split_over(x, inputs.rules, "fsdp"))
  replicated = inputs.param_bytes - split
  assert state["params"] == split // fsdp + replicated
  assert replicated < 0.02 * inputs.param_bytes


def test_uneven_split_pads_to_ceil():
  leaf = scaling_model.Leaf("x/kernel", (384, 10), 4, ("embed", None))
  rules = {"embed": "fsdp"}
  assert scaling_model.shard_bytes(leaf, rules, {"data": 1, "fsdp": 128, "tensor": 1}) == 3 * 10 * 4
  assert scaling_model.shard_bytes(leaf, rules, {"data": 1, "fsdp": 256, "tensor": 1}) == 2 * 10 * 4


@pytest.mark.parametrize("n", [2, 4, 8, 64, 1024])
def test_collective_bytes_per_device(n):
  size = 1e9
  for op, passes in (("all-gather", 1), ("reduce-scatter", 1), ("all-reduce", 2)):
    flat = scaling_model.collective(HW, op, size, n, n, 1.0)  # one fast domain of n (no slow link)
    assert flat.slow_bytes == 0
    assert flat.fast_bytes == pytest.approx(passes * (n - 1) / n * size)
    # Hierarchical (fast domains of 4): the same total, 1/inner of it across domains.
    tiered = scaling_model.collective(HW, op, size, n, min(n, HW.domain), 1.0)
    assert tiered.fast_bytes + tiered.slow_bytes == pytest.approx(passes * (n - 1) / n * size)
    if n > HW.domain:
      outer = n // HW.domain
      assert tiered.slow_bytes == pytest.approx(passes * (outer - 1) / outer * size / HW.domain)


def test_dp_all_reduce_and_fsdp_bytes_scale_with_n():
  config = tiny_config()
  inputs = _inputs(config)
  p = inputs.param_bytes
  split = sum(x.size * x.itemsize for x in inputs.leaves
              if scaling_model.split_over(x, inputs.rules, "fsdp"))
  dp, fsdp = [], []
  for n in (2, 4, 8, 64, 1024):
    t = scaling_model.step_traffic(inputs.leaves, inputs.rules, config, HW, n, 1, n)["params"]
    dp.append(t.fast_bytes + t.slow_bytes)
    assert dp[-1] == pytest.approx(2 * (n - 1) / n * p)  # ring all-reduce of the gradients
    t = scaling_model.step_traffic(inputs.leaves, inputs.rules, config, HW, 1, n, n)["params"]
    fsdp.append(t.fast_bytes + t.slow_bytes)
    # all-gather + reduce-scatter of the split tensors, all-reduce of the replicated ones
    assert fsdp[-1] == pytest.approx(2 * (n - 1) / n * p)
    gather_only = scaling_model.step_traffic(inputs.leaves, inputs.rules, config, HW, 1, n, n,
                                             regather=True)["params"]
    regathered = gather_only.fast_bytes + gather_only.slow_bytes - fsdp[-1]
    assert regathered == pytest.approx((n - 1) / n * split)  # one more all-gather
  # Per-device traffic tends to a constant (2 x parameter bytes): the all-gather to the full
  # parameter bytes, while the per-device state falls as 1/N.
  assert dp == sorted(dp) and dp[-1] / (2 * p) > 0.999
  assert fsdp[-1] / (2 * p) > 0.999
  states = [
      scaling_model.state_per_device(inputs.leaves, inputs.rules, 1, n)["params"]
      for n in (1, 2, 4, 8)
  ]
  assert states == sorted(states, reverse=True)


def test_hybrid_all_reduces_only_the_gradient_shard_over_data():
  config = tiny_config()
  inputs = _inputs(config)
  d, f = 4, 2
  split = sum(x.size * x.itemsize for x in inputs.leaves
              if scaling_model.split_over(x, inputs.rules, "fsdp"))
  replicated = inputs.param_bytes - split
  t = scaling_model.step_traffic(inputs.leaves, inputs.rules, config, HW, d, f, 8)["params"]
  want = (2 * (f - 1) / f * split + 2 * (d - 1) / d * split / f + 2 * (d * f - 1) /
          (d * f) * replicated)
  assert t.fast_bytes + t.slow_bytes == pytest.approx(want)


def test_contrastive_and_topk_bytes_from_the_config():
  config = tiny_config()
  m = config.model
  patches = (m.image.size // m.image.patch)**2
  keep = masking.num_kept_patches(patches, config.masking.image_ratio)
  length = config.data.max_len
  assert scaling_model.gla_gather_bytes(config, 16) == 16 * (1 + patches + length) * m.gla.dim * 4
  assert scaling_model.topk_gather_bytes(
      config, 16) == 16 * m.memory.heads * (1 + keep + length) * m.memory.slots * 4
  # GLA: an all-gather forward and a reduce-scatter backward over all N devices.
  for n in (2, 8):
    t = scaling_model.step_traffic(scaling_model.param_leaves(config),
                                   dict(sharding.rules(config.mesh)), config, HW, n, 1, 32)["gla"]
    assert t.fast_bytes + t.slow_bytes == pytest.approx(2 * (n - 1) / n *
                                                        scaling_model.gla_gather_bytes(config, 32))
  config.model.memory.enabled = False
  assert scaling_model.topk_gather_bytes(config, 16) == 0


def test_step_row_compute_memory_and_linear_fit():
  config = tiny_config()
  inputs = _inputs(config)
  row = scaling_model.step_row(inputs, HW, 2, 4, 32)
  assert row["per_dev"] == 4
  assert row["tflop"] * 1e12 == pytest.approx(flops.train_step_flops(config, 32) / 8)
  assert row["compute_ms"] == pytest.approx(row["tflop"] / (HW.peak_tflops * 0.45) * 1e3)
  assert row["mem_asis_gib"] > row["mem_gib"] > 0
  a, b = scaling_model.linear_fit({2: 10 + 2 * 3, 4: 10 + 4 * 3, 8: 10 + 8 * 3})
  assert (a, b) == (pytest.approx(10), pytest.approx(3))
  assert scaling_model.block_input_bytes(config) > 0


def test_figures_quoted_in_the_text_come_from_the_model():
  config = tiny_config()
  inputs = _inputs(config)
  rows = scaling_model.all_rows(inputs)
  figures = scaling_model.figures(inputs, rows, {"none": {2: 3e9, 4: 4e9, 8: 6e9}})
  assert figures["summary: parameters"] == sum(x.size for x in inputs.leaves)
  assert figures["2: temp slope MiB per example 4->8"] == pytest.approx(0.5e9 / scaling_model.MIB)
  assert figures["7 tensor: all-reduce MiB per example at tensor = 2"] == pytest.approx(
      scaling_model.tp_allreduce_bytes(config) / scaling_model.MIB)
  assert not any("XLA" in k for k in figures)  # no HLO measurement given


# --- benchmarks/scaling.py: the tables of docs/scaling_model.md ---------------------------------
DOC = os.path.join(ROOT, "docs", "scaling_model.md")
_BLOCK = re.compile(r"^(<!-- scaling-table:([\w-]+) -->\n).*?^(<!-- /scaling-table:\2 -->)$",
                    re.M | re.S)


def _outside_tables(doc: str) -> str:
  """The document with every table between its markers left out (the markers kept)."""
  return _BLOCK.sub(r"\1\3", doc)


def test_regenerated_tables_replace_only_what_is_between_the_markers(tmp_path):
  copy = tmp_path / "scaling_model.md"
  shutil.copy(DOC, copy)
  doc = copy.read_text()
  old = scaling.read_tables(doc)
  assert set(old) == {
      "summary", "parameters", "state", "activations", "flops", "collectives-xla", "hardware",
      "steps-v5e", "steps-h100"
  }
  # Tables of another (tiny) config: every generated table changes, the HLO one is not generated.
  config = tiny_config()
  inputs = _inputs(config)
  measured = {"none": {2: 3_000_000_000, 4: 4_000_000_000}}
  new = scaling.tables(inputs, scaling_model.all_rows(inputs), measured, frozenset(), hlo=None)
  assert "collectives-xla" not in new and set(new) < set(old)
  regenerated = scaling.replace_tables(doc, new)
  copy.write_text(regenerated)

  assert _outside_tables(copy.read_text()) == _outside_tables(doc)  # the text, byte for byte
  after = scaling.read_tables(copy.read_text())
  for name in old:
    assert after[name] == (new[name] if name in new else old[name]), name
    if name in new and name != "hardware":  # the hardware table does not depend on the config
      assert after[name] != old[name], name
  assert "| 4 | 3.725 |" in after["activations"]  # 4e9 bytes in GiB
  # Idempotent, and the document's own tables give back the document.
  assert scaling.replace_tables(regenerated, new) == regenerated
  assert scaling.replace_tables(regenerated, old) == doc


def test_markers_are_checked():
  table = "| a |\n|:---|\n| 1 |"
  doc = ("text `<!-- scaling-table:quoted -->` in a line\n\n<!-- scaling-table:t -->\n\n"
         f"{table}\n\n<!-- /scaling-table:t -->\nmore text\n")
  assert scaling.read_tables(doc) == {"t": table}
  replaced = scaling.replace_tables(doc, {"t": "| b |\n|:---|"})
  assert replaced == doc.replace(table, "| b |\n|:---|")
  with pytest.raises(ValueError, match="no scaling-table markers"):
    scaling.replace_tables(doc, {"other": table})
  with pytest.raises(ValueError, match="closing marker"):
    scaling.read_tables(doc + "<!-- scaling-table:open -->\n| x |\n")
  with pytest.raises(ValueError, match="marked twice"):
    scaling.read_tables(doc + doc)


@pytest.mark.slow
def test_command_checks_and_rewrites_the_documents_tables(tmp_path, capsys):
  """The committed document is current for the analytic tables (--check, no compile); a changed
  assumption rewrites the tables and only them, which --check then reports."""
  copy = tmp_path / "scaling_model.md"
  shutil.copy(DOC, copy)
  committed = copy.read_text()
  fast = ["--no_measure", "--no_hlo", "--doc", str(copy)]
  assert scaling.main(fast + ["--check", "--figures"]) == 0
  assert "summary: parameters: 377,005,917" in capsys.readouterr().out
  assert scaling.main(fast + ["--mfu", "0.3", "--write", str(copy)]) == 0
  written = copy.read_text()
  assert written != committed
  assert _outside_tables(written) == _outside_tables(committed)
  for name in scaling.MEASURED_TABLES:  # not measured: kept
    assert scaling.read_tables(written)[name] == scaling.read_tables(committed)[name]
  assert scaling.main(fast + ["--check"]) == 1  # the default MFU gives other tables
  assert "+++ regenerated (steps-v5e)" in capsys.readouterr().err
  assert copy.read_text() == written  # --check writes nothing
