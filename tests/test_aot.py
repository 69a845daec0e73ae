"""mpma-compile (aot.py): the HLO collective parser, the real step compiled for a TPU topology with
sane memory and cost figures, --suggest's promise, and saved executables that run."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mpma_jax import aot, optim, sharding, train
from mpma_jax.data import pipeline
from mpma_jax.models.mpma import MPMA
from tests.conftest import tiny_config

HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input_0: f32[64,32]) -> f32[16,32] {
  %input_0 = f32[64,32]{1,0} parameter(0)
  %all-reduce.7 = f32[64,32]{1,0:T(8,128)} all-reduce(%input_0), channel_id=3, replica_groups=[1,4]<=[4], to_apply=%add
  ROOT %ds = f32[16,32]{1,0} dynamic-slice(%all-reduce.7, %c, %c), dynamic_slice_sizes={16,32}
}

%fused_slice (param_0: f32[12,64,64], param_1: s32[]) -> f32[64,64] {
  %param_0 = f32[12,64,64]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %ds.2 = f32[1,64,64]{2,1,0} dynamic-slice(%param_0, %param_1, %z, %z), dynamic_slice_sizes={1,64,64}
  ROOT %b = f32[64,64]{1,0} bitcast(%ds.2)
}

%body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p = (s32[], bf16[8,128]) parameter(0)
  %stack = f32[12,64,64]{2,1,0} get-tuple-element(%p), index=2
  %i = s32[] get-tuple-element(%p), index=0
  %layer = f32[64,64]{1,0} fusion(%stack, %i), kind=kLoop, calls=%fused_slice
  %w = bf16[2,128]{1,0} get-tuple-element(%p), index=1
  %all-gather.3 = bf16[8,128]{1,0:T(8,128)(2,1)} all-gather(%w), channel_id=1, replica_groups=mesh['data'=2, 'fsdp'=4] {'fsdp'}, dimensions={0}
  ROOT %t = (s32[], bf16[8,128]) tuple(%i, %all-gather.3)
}

%cond (p: (s32[], bf16[8,128])) -> pred[] {
  %p = (s32[], bf16[8,128]) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[4,4]) -> f32[] {
  %x = f32[4,4]{1,0} parameter(0)
  %while.1 = (s32[], bf16[8,128]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %ags = (f32[1,256], f32[4,256]) all-gather-start(%y), channel_id=5, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %agd = f32[4,256]{1,0} all-gather-done(%ags)
  %fusion.9 = f32[16,32]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  %ar = (f32[10], s32[3]) all-reduce(%u, %v), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %cp = f32[100]{0} collective-permute(%q), channel_id=7, source_target_pairs={{0,1},{1,0}}
  ROOT %r = f32[] constant(0)
}
"""


def test_collective_parser_counts_loops_async_pairs_and_fused_reduce_scatter():
  found = aot.collectives(HLO, num_devices=8)
  by_kind = {}
  for c in found:
    by_kind.setdefault(c.kind, []).append(c)
  ag = sorted(by_kind["all-gather"], key=lambda c: c.bytes)
  # In the loop body: bf16[8,128] = 2 KiB, 12 trips, group = the 'fsdp' axis (4).
  assert (ag[0].bytes, ag[0].count, ag[0].group) == (8 * 128 * 2, 12, 4)
  # The async pair counts once, at -done (f32[4,256]); its groups come from the -start.
  assert (ag[1].bytes, ag[1].count, ag[1].group) == (4 * 256 * 4, 1, 4)
  [rs] = by_kind["reduce-scatter"]  # the all-reduce inside all-reduce-scatter.*: the full input
  assert (rs.bytes, rs.count, rs.group) == (64 * 32 * 4, 1, 4)
  [ar] = by_kind["all-reduce"]  # a tuple: both buffers
  assert (ar.bytes, ar.group) == (10 * 4 + 3 * 4, 8)
  [cp] = by_kind["collective-permute"]
  assert cp.bytes == 400
  summary = aot.collective_summary(found)
  assert summary["all-gather"] == {"ops": 13, "bytes": 12 * 2048 + 4096}
  assert summary["all-to-all"] == {"ops": 0, "bytes": 0.0}


def test_hbm_bytes_count_loops_in_full_and_sliced_operands_as_slices():
  hlo = aot.parse_hlo(HLO)
  assert hlo.runs["body"] == 12 and "body" in hlo.sequences and "fused_slice" not in hlo.sequences
  # Per trip: the fusion reads one [64, 64] layer of the stack (not all 12) and the s32 index,
  # writes [64, 64]; the all-gather reads bf16[2,128] and writes bf16[8,128].
  body = (64 * 64 * 4 + 4 + 64 * 64 * 4) + (2 * 128 * 2 + 8 * 128 * 2)
  assert aot.step_hbm_bytes(hlo) >= 12 * body
  entry_only = aot.step_hbm_bytes(hlo) - 12 * body
  assert 0 < entry_only < 12 * body  # the ENTRY's few ops, counted once


# XLA:TPU's compiled HLO: loops without known_trip_count (a scan counting 0..12 by 1; a windowed
# einsum counting 0..8 by 2 whose permutes gather a weight), one all-gather split over the async
# collective fusions that start and finish it (one channel), a scan writing its layer's output
# into the [12, ...] stack in place, and a stacked operand that a nested fusion only slices.
TPU_HLO = """HloModule tpu

%slice_layer (p0: f32[12,64,64], p1: s32[]) -> f32[64,64] {
  %p0 = f32[12,64,64]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %ds = f32[1,64,64]{2,1,0} dynamic-slice(%p0, %p1, %p1, %p1), dynamic_slice_sizes={1,64,64}
  ROOT %b = f32[64,64]{1,0} bitcast(%ds)
}

%outer (q0: f32[12,64,64], q1: s32[]) -> f32[64,64] {
  %q0 = f32[12,64,64]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  ROOT %f = f32[64,64]{1,0} fusion(%q0, %q1), kind=kLoop, calls=%slice_layer
}

%write_layer (r0: f32[12,64,64], r1: f32[1,64,64], r2: s32[]) -> f32[12,64,64] {
  %r0 = f32[12,64,64]{2,1,0} parameter(0)
  %r1 = f32[1,64,64]{2,1,0} parameter(1)
  %r2 = s32[] parameter(2)
  ROOT %dus = f32[12,64,64]{2,1,0} dynamic-update-slice(%r0, %r1, %r2, %r2, %r2)
}

%ag_start (a0: bf16[2,256]) -> (bf16[2,256], bf16[8,256]) {
  %a0 = bf16[2,256]{1,0} parameter(0)
  %ag.1 = bf16[8,256]{1,0} all-gather(%a0), channel_id=40, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %t = (bf16[2,256], bf16[8,256]) tuple(%a0, %ag.1)
}

%ag_done (d0: bf16[2,256], d1: bf16[8,256]) -> bf16[8,256] {
  %d0 = bf16[2,256]{1,0} parameter(0)
  %d1 = bf16[8,256]{1,0} parameter(1)
  ROOT %ag.2 = bf16[8,256]{1,0} all-gather(%d0), channel_id=40, replica_groups=[1,4]<=[4], dimensions={0}
}

%wide.windowed_dot_general_body_ag.1 (w: (bf16[16,128], u32[])) -> (bf16[16,128], u32[]) {
  %w = (bf16[16,128], u32[]) parameter(0)
  %chunk = bf16[16,128]{1,0} get-tuple-element(%w), index=0
  %k = u32[] get-tuple-element(%w), index=1
  %cps.1 = (bf16[16,128], bf16[16,128]) collective-permute-start(%chunk), channel_id=41, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %cpd.1 = bf16[16,128]{1,0} collective-permute-done(%cps.1)
  %cps.2 = (bf16[16,128], bf16[16,128]) collective-permute-start(%chunk), channel_id=42, source_target_pairs={{0,3},{1,0},{2,1},{3,2}}
  %cpd.2 = bf16[16,128]{1,0} collective-permute-done(%cps.2)
  %two = u32[] constant(2)
  %next = u32[] add(%k, %two)
  ROOT %out = (bf16[16,128], u32[]) tuple(%cpd.2, %next)
}

%wide.windowed_dot_general_cond_ag.1 (c: (bf16[16,128], u32[])) -> pred[] {
  %c = (bf16[16,128], u32[]) parameter(0)
  %limit = u32[] constant(8)
  %ck = u32[] get-tuple-element(%c), index=1
  ROOT %lt = pred[] compare(%ck, %limit), direction=LT
}

%scan_body (s: (s32[], f32[12,64,64], f32[12,64,64], f32[1,64,64])) -> (s32[], f32[12,64,64], f32[12,64,64], f32[1,64,64]) {
  %s = (s32[], f32[12,64,64], f32[12,64,64], f32[1,64,64]) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %stack = f32[12,64,64]{2,1,0} get-tuple-element(%s), index=1
  %acts = f32[12,64,64]{2,1,0} get-tuple-element(%s), index=2
  %x = f32[1,64,64]{2,1,0} get-tuple-element(%s), index=3
  %layer = f32[64,64]{1,0} fusion(%stack, %i), kind=kLoop, calls=%outer
  %written = f32[12,64,64]{2,1,0} fusion(%acts, %x, %i), kind=kLoop, calls=%write_layer
  %one = s32[] constant(1)
  %i2 = s32[] add(%i, %one)
  ROOT %o = (s32[], f32[12,64,64], f32[12,64,64], f32[1,64,64]) tuple(%i2, %stack, %written, %x)
}

%scan_cond (sc: (s32[], f32[12,64,64], f32[12,64,64], f32[1,64,64])) -> pred[] {
  %sc = (s32[], f32[12,64,64], f32[12,64,64], f32[1,64,64]) parameter(0)
  %si = s32[] get-tuple-element(%sc), index=0
  %n = s32[] constant(12)
  ROOT %more = pred[] compare(%n, %si), direction=GT
}

ENTRY %main (e0: f32[12,64,64], e1: bf16[2,256], e2: bf16[16,128]) -> f32[] {
  %e0 = f32[12,64,64]{2,1,0} parameter(0)
  %e1 = bf16[2,256]{1,0} parameter(1)
  %e2 = bf16[16,128]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %uzero = u32[] constant(0)
  %x0 = f32[1,64,64]{2,1,0} constant({...})
  %init = (s32[], f32[12,64,64], f32[12,64,64], f32[1,64,64]) tuple(%zero, %e0, %e0, %x0)
  %loop = (s32[], f32[12,64,64], f32[12,64,64], f32[1,64,64]) while(%init), condition=%scan_cond, body=%scan_body
  %winit = (bf16[16,128], u32[]) tuple(%e2, %uzero)
  %window = (bf16[16,128], u32[]) while(%winit), condition=%wide.windowed_dot_general_cond_ag.1, body=%wide.windowed_dot_general_body_ag.1
  %start = (bf16[2,256], bf16[8,256]) fusion(%e1), kind=kCustom, calls=%ag_start
  %s0 = bf16[2,256]{1,0} get-tuple-element(%start), index=0
  %s1 = bf16[8,256]{1,0} get-tuple-element(%start), index=1
  %done = bf16[8,256]{1,0} fusion(%s0, %s1), kind=kCustom, calls=%ag_done
  ROOT %r = f32[] constant(0)
}
"""


def test_tpu_hlo_loops_windowed_einsum_async_fusions_and_in_place_updates():
  hlo = aot.parse_hlo(TPU_HLO)
  # Trip counts read from the conditions: 12 (N > i, from 0 by 1) and 4 (k < 8, from 0 by 2).
  assert hlo.runs["scan_body"] == 12
  assert hlo.runs["wide.windowed_dot_general_body_ag.1"] == 4
  summary = aot.collective_summary(aot.collectives(hlo, num_devices=4))
  # The windowed loop's 2 permutes x 4 trips are an all-gather of 8 chunks of bf16[16,128]; the
  # async fusions' two all-gathers (channel 40) are one bf16[8,256] gather.
  assert summary["all-gather"] == {"ops": 8 + 1, "bytes": 8 * 16 * 128 * 2 + 8 * 256 * 2}
  assert summary["collective-permute"] == {"ops": 0, "bytes": 0.0}
  ring = [c for c in aot.collectives(hlo, 4) if c.bytes == 16 * 128 * 2]
  assert {c.group for c in ring} == {4}  # the ring the permutes go round
  # Per scan trip: the nested fusion reads one [64, 64] layer (+ the s32 index) and writes
  # [64, 64]; the in-place update reads the [1, 64, 64] update (+ index) and writes it, not the
  # [12, 64, 64] stack.
  layer = 64 * 64 * 4
  per_trip = (layer + 4 + layer) + (layer + 4 + layer) + 4 + 4  # + the counter's add
  scan = aot.step_hbm_bytes(hlo) - aot.step_hbm_bytes(
      aot.parse_hlo(
          TPU_HLO.replace("while(%init), condition=%scan_cond, body=%scan_body", "tuple(%zero)")))
  assert scan == pytest.approx(12 * per_trip, rel=0.01)


def test_collective_time_follows_ring_algorithms():
  chip = aot.CHIPS["v5e"]
  bw = chip.link_gbps * 1e9 * chip.ring_links
  gather = aot.Collective("all-gather", 1e9, 4, 1)
  reduce = aot.Collective("all-reduce", 1e9, 4, 1)
  lat = aot.COLLECTIVE_LATENCY_S
  assert aot.collective_seconds(gather, chip) == pytest.approx(0.75e9 / bw + lat)
  assert aot.collective_seconds(reduce, chip) == pytest.approx(1.5e9 / bw + lat)
  assert aot.collective_seconds(aot.Collective("all-gather", 1e9, 1, 3), chip) == 0.0


def test_bad_topologies_name_the_value():
  for bad in ("v9:2x2", "v5e", "v5e:2y2", "cpu:"):
    with pytest.raises(ValueError, match="--topology"):
      aot.parse_topology(bad)
  with pytest.raises(ValueError, match="only 8 CPU devices"):
    aot.target_devices("cpu:64")


def _scanned_tiny(data, fsdp):
  config = tiny_config()
  config.model.scan = True
  config.mesh.update(data=data, fsdp=fsdp, tensor=1)
  return config


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="TPU topologies need libtpu (pip install '.[aot]')")


@pytest.mark.slow
@needs_libtpu
def test_tiny_step_compiles_for_a_tpu_topology_with_sane_figures():
  # The training code's own step, for 4 v5e chips this machine does not have: nothing may run
  # eagerly on them (it would fail), so this also proves the state creation is AOT-safe.
  devices = aot.target_devices("v5e:2x2")
  assert len(devices) == 4 and devices[0].platform == "tpu"
  fsdp = aot.report(_scanned_tiny(1, 4), aot.compile_step(_scanned_tiny(1, 4), "v5e:2x2", devices))
  dp = aot.report(_scanned_tiny(4, 1), aot.compile_step(_scanned_tiny(4, 1), "v5e:2x2", devices))
  for r in (fsdp, dp):
    assert r["fits"] and r["memory"]["peak"] > 0 and r["memory"]["temporaries"] > 0
    assert all(v >= 0 for v in r["memory"].values())
    # XLA counts each scanned loop body once: its FLOPs are a part of the analytic count, which
    # the estimate uses (the roofline's compute term is at least the model FLOPs).
    assert 0.2 < r["xla_cost"]["flops"] / r["analytic_flops_per_device"] < 1.0
    assert r["estimate"]["compute_s"] * aot.CHIPS["v5e"].peak("float32") >= (
        r["analytic_flops_per_device"] * 0.999)
    # The update reads and writes the whole per-device state at least once.
    assert r["hbm_bytes_per_step"] >= 2 * r["memory"]["arguments"]
    assert r["estimate"]["step_s"] > 0 and 0 < r["estimate"]["mfu"] < 1
  # XLA's arguments are this device's shards of the state and the batch as the shardings say,
  # padded to the TPU's (8, 128) tiles (which, at this tiny width, can double a small shard); FSDP
  # over 4 holds less than half of what DP replicates.
  for r, (data, fsdp_size) in ((fsdp, (1, 4)), (dp, (4, 1))):
    want = _argument_bytes(_scanned_tiny(data, fsdp_size), devices)
    assert want <= r["memory"]["arguments"] <= 4 * want, (r["memory"]["arguments"], want)
  assert fsdp["memory"]["arguments"] < 0.5 * dp["memory"]["arguments"]
  # FSDP gathers parameters and scatters gradients; DP all-reduces gradients and gathers nothing.
  assert fsdp["collectives"]["all-gather"]["bytes"] > 0
  assert dp["collectives"]["all-gather"]["bytes"] < 0.1 * fsdp["collectives"]["all-gather"]["bytes"]
  assert dp["collectives"]["all-reduce"]["bytes"] > 0


def _argument_bytes(config, devices) -> float:
  """Per-device bytes of the sharded train state plus the batch's shard, from the shardings."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  mesh, rules = sharding.make_mesh(config.mesh, devices), sharding.rules(config.mesh)
  model, tx = MPMA.from_config(config), optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, _ = train.abstract_state(config, model, tx, mesh, rules)
  state = sum(
      math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
      for x in jax.tree.leaves(abstract))
  split = config.mesh.data * config.mesh.fsdp
  batch = sum(v.nbytes for v in pipeline.dummy_batch(config, config.train.batch_size).values())
  return state + batch / split


@pytest.mark.slow
def test_suggest_only_proposes_settings_whose_compile_fits():
  config = tiny_config()
  config.model.scan = True
  devices = aot.target_devices("cpu:4")
  probe = aot.report(config, aot.compile_step(_scanned_tiny(4, 1), "cpu:4", devices))
  # A limit below DP's compiled peak: some settings must fail, and none of them may be proposed.
  limit = 0.8 * probe["memory"]["peak"]
  result = aot.suggest(config, "cpu:4", devices, max_compiles=6, hbm_bytes=limit)
  assert result["compiles"] >= 2
  assert any(not r["fits"] for r in result["tried"])
  for r in result["fits"]:
    assert r["memory"]["peak"] <= limit
  # Whatever fits is what a compile of exactly that setting says fits.
  if result["fits"]:
    best = result["fits"][0]["setting"]
    again = _scanned_tiny(best["mesh"]["data"], best["mesh"]["fsdp"])
    again.model.remat, again.train.grad_accum = best["remat"], best["grad_accum"]
    r = aot.report(again, aot.compile_step(again, "cpu:4", devices), limit)
    assert r["fits"]
  text = aot.format_suggestions(result)
  assert "not fitting" in text


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_OVERRIDES = [
    "--config.model.scan=True", "--config.train.batch_size=8", "--config.mesh.data=-1",
    "--config.mesh.fsdp=1", "--config.mesh.tensor=1"
]


@pytest.mark.slow
def test_cli_reports_fit_writes_json_and_saves_a_step_that_runs(tmp_path):
  # The warm test cache is passed on: --save must compile afresh, since an executable read back
  # from the cache serializes without its functions on XLA:CPU.
  out, exe = tmp_path / "r.json", tmp_path / "step.exe"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
  proc = subprocess.run([
      sys.executable, "-m", "mpma_jax.cli.compile", "--config", "configs/pretrain.py:tiny",
      "--topology", "cpu:8", *CLI_OVERRIDES, "--hbm_gib=16", f"--json={out}", f"--save={exe}"
  ], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "FITS" in proc.stdout and "collectives per step" in proc.stdout
  report = json.loads(out.read_text())
  assert report["devices"] == 8 and report["fits"] and report["memory"]["peak"] > 0

  # The saved step, loaded onto the test process's 8 devices, equals the step jitted here.
  from mpma_jax.configs.pretrain import get_config  # pylint: disable=g-import-not-at-top
  config = get_config("tiny")
  config.model.scan, config.train.batch_size = True, 8
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  loaded = aot.load_executable(str(exe))
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.mesh)
  model, tx = MPMA.from_config(config), optim.make_optimizer(config)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = train.create_train_state(config, model, tx, mesh, rules)
    step = train.make_train_step(config, model, tx, shardings, mesh)
    batch = sharding.global_batch(pipeline.dummy_batch(config, config.train.batch_size), mesh)
    want_state, want = step(jax.tree.map(lambda x: x.copy(), state), batch)
    got_state, got = loaded(state, batch)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               got_state.params, want_state.params)

  bad = subprocess.run([
      sys.executable, "-m", "mpma_jax.cli.compile", "--config", "configs/pretrain.py:tiny",
      "--topology", "v9:2x2"
  ], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("mpma-compile: --topology 'v9:2x2'")


def _abort():
  os.abort()


def _raise():
  raise ValueError("no such setting\nsecond line")


def _double(x):
  return 2 * x


def test_a_child_that_aborts_or_raises_does_not_end_the_parent():
  assert aot.run_isolated(_double, 21) == (42, None)
  result, why = aot.run_isolated(_raise)
  assert result is None and why == "ValueError: no such setting"
  result, why = aot.run_isolated(_abort, timeout=120)
  assert result is None and why, why


@pytest.mark.slow
def test_suggest_in_child_processes_matches_in_process():
  """The isolated search (each compile in its own process, as mpma-compile --suggest runs it)
  gives the same rows as compiling here."""
  config = _scanned_tiny(4, 1)
  config.train.batch_size = 8
  here = aot.suggest(config, "cpu:4", jax.devices()[:4], max_compiles=1, isolate=False)
  there = aot.suggest(config, "cpu:4", max_compiles=1, isolate=True)
  assert there["compiles"] == here["compiles"] == 1
  a, b = here["tried"][0], there["tried"][0]
  assert a["setting"] == b["setting"] and a["fits"] == b["fits"]
  assert a["memory"]["peak"] == b["memory"]["peak"]


@pytest.mark.slow
def test_suggest_moves_past_a_mesh_that_a_parameter_does_not_divide():
  """MIM decoder width 36 does not split 8 ways: the fsdp-8 mesh fails while lowering (no XLA
  compile, not counted), and the search goes on to fsdp 4 within max_compiles=1."""
  config = _scanned_tiny(8, 1)
  config.model.mim.width = 36
  config.train.batch_size = 8
  result = aot.suggest(config, "cpu:8", max_compiles=1, isolate=True)
  first = result["tried"][0]
  assert first["setting"]["mesh"]["fsdp"] == 8 and "IndivisibleError" in first["skipped"]
  assert result["compiles"] == 1
  assert result["tried"][1]["setting"]["mesh"]["fsdp"] == 4 and "memory" in result["tried"][1]
