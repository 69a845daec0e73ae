"""Per-device memory of the pre-training train step under FSDP, from shardings and from XLA.

  python benchmarks/memory_fit.py [--config base] [--batch_size N] [--fsdp 1,2,4,8]
                              [--dtype float32|bfloat16] [--json out.json]

Runs on 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, unless the
caller already set a device count); the mesh for fsdp=k is data=8/k, fsdp=k, tensor=1. Nothing is
allocated: for each setting the sharded train state is built abstractly (train.abstract_state) and
the jitted train step is lowered and compiled against ShapeDtypeStructs. Prints, per setting:

  * parameter and optimizer-state bytes per device, exact from the shardings
    (sum over leaves of prod(sharding.shard_shape(shape)) * itemsize), and a check that XLA's
    argument size equals state + batch shards (jit drops inputs the step never reads);
  * XLA's memory analysis of the compiled step (argument, output, alias, temp, generated code,
    peak; per device, as the SPMD-partitioned program is one device's program) and compile time;

then one Markdown table, and a PASS/FAIL line for the target: with fsdp=8 the parameter +
optimizer bytes per device are at most 0.15 of fsdp=1. Parameters that stay replicated over fsdp
(no logical axis mapped to it) are listed with their bytes when the target fails, or with
--list_replicated.

The batch defaults to the config's train.batch_size (256 for base): on CPU neither the compile time
(~1.5-2.5 min per setting on 2 cores) nor the compiler's RAM (~3 GB) grows with it, and only XLA's
temp depends on it. Temp is the CPU compiler's buffer assignment: activations are kept in full for
the backward pass (no fused attention), and all-gathered weights live for the whole step, so it is
an upper bound for an accelerator, not a prediction. On CPU `peak_memory` leaves out temp.
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import math
import sys
import time

import flax.linen as nn
import jax
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

from mpma_jax import optim, sharding, train
from mpma_jax.configs.pretrain import get_config
from mpma_jax.data import pipeline
from mpma_jax.models.mpma import MPMA

NUM_DEVICES = 8
TARGET = 0.15  # fsdp=8 (params + opt) bytes per device / fsdp=1
MIB = 2**20
# CompiledMemoryStats fields worth printing (those this jax version has are kept).
XLA_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  total = 0
  for x in jax.tree.leaves(tree):
    total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
  return total


def global_bytes(tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def with_mesh(config: ml_collections.ConfigDict, fsdp: int, num_devices: int = NUM_DEVICES):
  """A copy of config with mesh data = num_devices / fsdp, fsdp, tensor = 1."""
  if num_devices % fsdp:
    raise ValueError(f"fsdp={fsdp} does not divide the {num_devices} devices")
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.update(data=num_devices // fsdp, fsdp=fsdp, tensor=1)
  return config


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int, mesh) -> dict:
  """ShapeDtypeStructs of a global batch, sharded like sharding.global_batch would place it."""
  batch_sharding = sharding.batch_sharding(mesh)
  # dtypes canonicalised as device arrays get them (int64 'index' -> int32 without jax_enable_x64)
  return {
      k: jax.ShapeDtypeStruct(
          v.shape, jax.dtypes.canonicalize_dtype(v.dtype),
          sharding=batch_sharding) for k, v in pipeline.dummy_batch(config, batch_size).items()
  }


def replicated_params(config: ml_collections.ConfigDict, abstract_params) -> list[dict]:
  """Parameters whose sharding does not split them over 'fsdp': path, logical axes, shape, bytes
  (largest first). Logical names come from the boxed init, so the fix is readable off the list."""
  model = MPMA.from_config(config)
  boxed = jax.eval_shape(lambda: train.init_params(config, model, jax.random.key(0)))
  logical = nn.get_partition_spec(boxed)
  logical_leaves = dict(
      jax.tree_util.tree_flatten_with_path(
          logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    axes = [
        a for entry in x.sharding.spec if entry is not None
        for a in (entry if isinstance(entry, tuple) else (entry,))
    ]
    if "fsdp" not in axes:
      out.append({
          "param": "/".join(str(k.key) for k in path),
          "logical": tuple(logical_leaves.get(path, ())), "shape": tuple(x.shape),
          "bytes": math.prod(x.shape) * x.dtype.itemsize
      })
  return sorted(out, key=lambda r: -r["bytes"])


def measure(config: ml_collections.ConfigDict, fsdp: int, batch_size: int,
            compile_step: bool = True, devices=None) -> dict:
  """One setting: exact per-device state bytes from the shardings, and (compile_step) XLA's memory
  analysis of the compiled train step. Returns a flat dict of numbers."""
  devices = jax.devices()[:NUM_DEVICES] if devices is None else devices
  config = with_mesh(config, fsdp, len(devices))
  config.train.batch_size = batch_size  # the step checks it against train.grad_accum
  mesh = sharding.make_mesh(config.mesh, devices)
  rule_table = sharding.rules(config.mesh)
  model = MPMA.from_config(config)
  tx = optim.make_optimizer(config)
  result = {"fsdp": fsdp, "data": int(mesh.shape["data"]), "batch_size": batch_size}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
    state, state_shardings = train.abstract_state(config, model, tx, mesh, rule_table)
    result.update(
        params_bytes=bytes_per_device(state.params),
        opt_bytes=bytes_per_device(state.opt_state),
        state_bytes=bytes_per_device(state),  # + step and any other TrainState fields
        params_global_bytes=global_bytes(state.params),
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))
    if not compile_step:
      return result
    batch = abstract_batch(config, batch_size, mesh)
    result["batch_bytes"] = bytes_per_device(batch)
    step = train.make_train_step(config, model, tx, state_shardings, mesh)
    t = time.perf_counter()
    lowered = step.lower(state, batch)
    result["lower_s"] = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    result["compile_s"] = time.perf_counter() - t
  stats = compiled.memory_analysis()
  if stats is None:  # some backends do not implement it
    return result
  for field in XLA_FIELDS:
    if hasattr(stats, field):
      result[field] = int(getattr(stats, field))
  return result


def markdown_table(rows: list[dict], reference_bytes: int) -> str:
  mib = lambda r, k: f"{r[k] / MIB:,.1f}" if k in r else "-"
  lines = [
      "| fsdp | data | params MiB/dev | optimizer MiB/dev | (params+opt) / fsdp=1 | "
      "XLA argument MiB | XLA temp MiB | XLA output MiB | XLA alias MiB | compile s |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  ]
  for r in rows:
    ratio = (r["params_bytes"] + r["opt_bytes"]) / reference_bytes
    compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
    lines.append(f"| {r['fsdp']} | {r['data']} | {mib(r, 'params_bytes')} | "
                 f"{mib(r, 'opt_bytes')} | {ratio:.4f} | {mib(r, 'argument_size_in_bytes')} | "
                 f"{mib(r, 'temp_size_in_bytes')} | {mib(r, 'output_size_in_bytes')} | "
                 f"{mib(r, 'alias_size_in_bytes')} | {compile_s} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="base", help="variant of configs/pretrain.py")
  parser.add_argument(
      "--batch_size", type=int, default=0,
      help="global batch, divisible by 8 (0 = the config's train.batch_size); "
      "only XLA's temp depends on it")
  parser.add_argument("--fsdp", default="1,2,4,8", help="comma-separated fsdp sizes")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype (params and optimizer state stay float32)")
  parser.add_argument("--json", default="", help="write the results here")
  parser.add_argument("--no_compile", action="store_true",
                      help="state bytes only (seconds), no XLA compile")
  parser.add_argument("--list_replicated", action="store_true",
                      help="list the parameters not split over fsdp even if the target passes")
  args = parser.parse_args()

  if len(jax.devices()) < NUM_DEVICES:
    raise SystemExit(f"need {NUM_DEVICES} devices, have {len(jax.devices())}: XLA_FLAGS="
                     f"{os.environ.get('XLA_FLAGS', '')!r} sets fewer")
  config = get_config(args.config)
  config.model.dtype = args.dtype
  args.batch_size = args.batch_size or config.train.batch_size
  if args.batch_size % NUM_DEVICES:
    raise SystemExit(f"--batch_size {args.batch_size} must be divisible by {NUM_DEVICES} "
                     "(the batch is split over data x fsdp)")
  settings = [int(k) for k in args.fsdp.split(",")]
  print(
      f"config={args.config} dtype={args.dtype} global batch={args.batch_size} "
      f"devices={len(jax.devices())} x {jax.devices()[0].platform} (jax {jax.__version__})",
      flush=True)

  t_all = time.perf_counter()
  rows = []
  for k in settings:
    r = measure(config, k, args.batch_size, compile_step=not args.no_compile)
    rows.append(r)
    line = (f"fsdp={k} data={r['data']}: params {r['params_bytes'] / MIB:,.1f} MiB/dev "
            f"(of {r['params_global_bytes'] / MIB:,.1f}; {r['num_params']:,} parameters), "
            f"optimizer {r['opt_bytes'] / MIB:,.1f} MiB/dev")
    if "compile_s" in r:
      xla = ", ".join(f"{f.replace('_size_in_bytes', '').replace('_in_bytes', '')} "
                      f"{r[f] / MIB:,.1f}" for f in XLA_FIELDS if f in r)
      expected = r["state_bytes"] + r["batch_bytes"]
      line += (f"\n  XLA MiB/dev: {xla}; lower {r['lower_s']:.1f}s, compile {r['compile_s']:.1f}s"
               f"\n  argument check: state + batch shards = {expected / MIB:,.2f} MiB, "
               f"XLA argument = {r.get('argument_size_in_bytes', 0) / MIB:,.2f} MiB "
               f"(difference {r.get('argument_size_in_bytes', 0) - expected:+,} bytes; jit drops "
               "inputs the step never reads)")
    print(line, flush=True)

  reference = next((r for r in rows if r["fsdp"] == 1), None)
  if reference is None:  # cheap: no compile needed for the byte counts
    reference = measure(config, 1, args.batch_size, compile_step=False)
  ref_bytes = reference["params_bytes"] + reference["opt_bytes"]
  print(f"\n{markdown_table(rows, ref_bytes)}\n")

  fsdp8 = next((r for r in rows if r["fsdp"] == 8), None)
  if fsdp8 is None:
    fsdp8 = measure(config, 8, args.batch_size, compile_step=False)
  ratio = (fsdp8["params_bytes"] + fsdp8["opt_bytes"]) / ref_bytes
  passed = ratio <= TARGET
  print(f"target: fsdp=8 (params + optimizer) per device <= {TARGET} x fsdp=1: "
        f"{'PASS' if passed else 'FAIL'} (ratio {ratio:.4f}; 1/8 = 0.125 is the floor)")

  replicated = []
  if not passed or args.list_replicated:
    config8 = with_mesh(config, 8)
    mesh = sharding.make_mesh(config8.mesh, jax.devices()[:NUM_DEVICES])
    rule_table = sharding.rules(config8.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
      state, _ = train.abstract_state(config8, MPMA.from_config(config8),
                                      optim.make_optimizer(config8), mesh, rule_table)
      replicated = replicated_params(config8, state.params)
    total = sum(p["bytes"] for p in replicated)
    print(f"\n{len(replicated)} parameters not split over fsdp: {total / MIB:,.2f} MiB "
          f"({total / fsdp8['params_global_bytes']:.2%} of the parameters), each also x2 in Adam:")
    for p in replicated[:40]:
      print(f"  {p['bytes'] / MIB:9.3f} MiB  {p['param']}  {p['shape']}  logical {p['logical']}")
    if len(replicated) > 40:
      print(f"  ... and {len(replicated) - 40} more")
  print(f"\ntotal wall time {time.perf_counter() - t_all:.0f}s")

  if args.json:
    with open(args.json, "w") as f:
      json.dump(
          {
              "config": args.config, "dtype": args.dtype, "batch_size": args.batch_size,
              "devices": NUM_DEVICES, "target": TARGET, "fsdp8_ratio": ratio, "pass": passed,
              "results": rows, "replicated_over_fsdp":
                  [{**p, "logical": [str(a) for a in p["logical"]]} for p in replicated]
          }, f, indent=2)


if __name__ == "__main__":
  main()
