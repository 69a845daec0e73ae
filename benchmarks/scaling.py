"""Regenerates the tables of docs/scaling_model.md from the analytic scaling model.

  python benchmarks/scaling.py [--config base] [--batches 2,8] [--remat none[,full]]
                               [--no_measure] [--no_hlo] [--mfu 0.45] [--efficiency 0.8]
                               [--doc docs/scaling_model.md] [--write PATH] [--check] [--figures]

The model (benchmarks/scaling_model.py) describes one pre-training step per device, for data
parallelism (DP), FSDP and DP x FSDP hybrids on TPU v5e and on 8xH100 nodes. This command measures
what the model needs from XLA on this machine (CPU):

  * XLA's temp bytes of the compiled base train step on ONE CPU device at a few batch sizes
    (benchmarks/memory_fit.measure), fitted as temp = a + b * batch: the activation bytes per
    example (--no_measure: the bytes recorded in scaling_model.RECORDED);
  * the collectives XLA's SPMD partitioner emits for the step of the base config one layer deep
    on 8 simulated CPU devices (--no_hlo: skipped);

and writes the tables into the Markdown between marker comments, one pair per table:

  <!-- scaling-table:NAME -->
  ...
  <!-- /scaling-table:NAME -->

Everything outside the markers is the document's text, edited by hand, and left as it is; a table
whose measurement was skipped (activations with --no_measure, collectives-xla with --no_hlo) is
kept. Without --write the regenerated document is printed; --check exits 1 (with a diff) if the
document's tables differ from the regenerated ones; --figures prints the derived numbers the text
quotes (scaling_model.figures).

Runtime on 2 shared cores: each base compile takes 1-2 min (remat=full 2-2.5), the HLO check
~1.5 min: ~4 min by default; with --no_measure --no_hlo a few seconds. remat=full is taken from
RECORDED unless --remat asks for it.
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import collections
import difflib
import math
import re
import sys
import time
from typing import Optional

import flax.linen as nn
import jax
import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for configs/

from benchmarks import memory_fit as memory
from benchmarks import scaling_model as sm
from benchmarks.scaling_model import GIB, MIB
from mpma_jax import flops, optim, sharding, train
from mpma_jax.configs.pretrain import get_config
from mpma_jax.models.mpma import MPMA

DOC = os.path.join(ROOT, "docs", "scaling_model.md")
# Tables made from a measurement: kept in the document when the measurement is skipped.
MEASURED_TABLES = ("activations", "collectives-xla")


# --- measurements (CPU) ---------------------------------------------------------------------------
def measure_temp(config, batches, remat: str) -> dict[int, int]:
  """XLA temp bytes of the compiled train step on one CPU device, per batch size."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.remat = remat
  out = {}
  for b in batches:
    t = time.perf_counter()
    r = memory.measure(config, 1, b, devices=jax.devices()[:1])
    out[b] = r["temp_size_in_bytes"]
    print(
        f"  remat={remat} batch={b}: XLA temp {out[b] / GIB:.3f} GiB "
        f"(compile {r['compile_s']:.0f}s, total {time.perf_counter() - t:.0f}s)", file=sys.stderr,
        flush=True)
  return out


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(")


def hlo_collectives(config, fsdp: int, batch: int = 16) -> dict:
  """Result bytes of the collectives in the compiled SPMD train step on 8 CPU devices
  (data = 8 / fsdp), keyed '<op> param' (a parameter's full or shard shape) or '<op> other'."""
  devices = jax.devices()[:8]
  config = memory.with_mesh(config, fsdp, len(devices))
  config.train.batch_size = batch
  mesh = sharding.make_mesh(config.mesh, devices)
  rule_table = sharding.rules(config.mesh)
  model, tx = MPMA.from_config(config), optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
    state, shardings = train.abstract_state(config, model, tx, mesh, rule_table)
    step = train.make_train_step(config, model, tx, shardings, mesh)
    text = step.lower(state, memory.abstract_batch(config, batch, mesh)).compile().as_text()
  param_shapes = set()
  for x in jax.tree.leaves(state.params):
    param_shapes.update({tuple(x.shape), tuple(x.sharding.shard_shape(x.shape))})
  out = collections.defaultdict(float)
  for line in text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
      if dtype in _DTYPE_BYTES:
        shape = tuple(int(s) for s in dims.split(",") if s)
        kind = "param" if shape in param_shapes or not shape else "other"
        out[f"{match.group(2)} {kind}"] += _DTYPE_BYTES[dtype] * math.prod(shape)
  return dict(out)


# --- tables ---------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list], align: str = "") -> str:
  align = align or "l" + "r" * (len(header) - 1)
  lines = [
      "| " + " | ".join(header) + " |",
      "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"
  ]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _layout(r: dict) -> str:
  kind = "DP" if r["fsdp"] == 1 else "FSDP" if r["data"] == 1 else "hybrid"
  return f"{kind} ({r['data']}, {r['fsdp']}, 1)"


def summary_table(rows: list[dict]) -> str:
  """The recommended layout per hardware and device count (scaling_model.recommend)."""
  out = []
  for hw in sm.HARDWARE.values():
    for n in sm.DEVICES:
      r = sm.recommend(rows, hw, n)
      if r is None:
        out.append([hw.name, n, "nothing fits (needs train.grad_accum or remat)"] + ["-"] * 6)
        continue
      lo, hi = r["step_ms"]
      out.append([
          hw.name, n,
          _layout(r), f"{r['batch']:,}", r["per_dev"], f"{r['ratio']:.2f}",
          f"{r['ratio_asis']:.2f}", f"{lo:.0f}-{hi:.0f}", f"{r['ex_s']:,.0f}"
      ])
  return _table([
      "hardware", "N", "best layout (data, fsdp, tensor)", "global batch", "per dev",
      "comm / compute (top-k fixed)", "as is", "step ms", "examples/s"
  ], out, "lrlrrrrrr")


def params_table(inputs: sm.Inputs) -> str:
  """Parameters per component: eval_shape against the config-only count."""
  counts = collections.Counter()
  for x in inputs.leaves:
    counts[x.component] += x.size
  analytic = sm.analytic_param_counts(inputs.config)
  total = sum(counts.values())
  rows = [[
      k, f"{v:,}", f"{analytic.get(k, 0):,}" + ("" if analytic.get(k) == v else " (differs)"),
      f"{v * sm.F32 / MIB:,.1f}", f"{v / total:.1%}"
  ] for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
  rows.append([
      "**total**", f"**{total:,}**", f"{sum(analytic.values()):,}",
      f"**{total * sm.F32 / MIB:,.1f}**", "100%"
  ])
  return _table(["component", "parameters (eval_shape)", "analytic (config)", "MiB fp32", "share"],
                rows)


def state_table(inputs: sm.Inputs) -> str:
  """Parameter, AdamW and gradient bytes per device for DP and FSDP over N."""
  rows = []
  for label, data, fsdp in [("DP (replicated), any N", 1, 1), ("FSDP 8", 1, 8), ("FSDP 16", 1, 16),
                            ("FSDP 128", 1, 128), ("FSDP 256", 1, 256), ("FSDP 2048", 1, 2048)]:
    st = sm.state_per_device(inputs.leaves, inputs.rules, data, fsdp)
    uneven = sm.uneven_split(inputs, fsdp) if fsdp > 1 else []
    note = f"{len(uneven)} tensors split unevenly (padded)" if uneven else ""
    ideal = 4 * inputs.param_bytes / fsdp
    rows.append([
        label, f"{st['params'] / MIB:,.1f}", f"{st['adamw'] / MIB:,.1f}",
        f"{st['grads'] / MIB:,.1f}", f"{st['total'] / MIB:,.1f}", f"{st['total'] / ideal:.3f}", note
    ])
  return _table([
      "layout (fsdp = N)", "params MiB/dev", "AdamW MiB/dev", "grads MiB/dev", "total MiB/dev",
      "total / (4 P / N)", "note"
  ], rows, "lrrrrrl")


def activations_table(measured: dict, recorded: set) -> str:
  """XLA temp bytes per per-device batch and remat policy, with the linear fit."""
  fits = {k: sm.linear_fit(v) for k, v in measured.items()}
  batches = sorted({b for pts in measured.values() for b in pts})
  header = ["per-device batch"] + [
      f"XLA temp GiB, remat={k}" + (" (recorded)" if k in recorded else "") for k in measured
  ]
  rows = [[b] + [f"{measured[k][b] / GIB:.3f}" if b in measured[k] else "-" for k in measured]
          for b in batches]
  rows.append(["fit a (GiB)"] + [f"{fits[k][0] / GIB:.3f}" for k in measured])
  rows.append(["fit b (MiB / example)"] + [f"{fits[k][1] / MIB:.0f}" for k in measured])
  return _table(header, rows)


def flops_table(config) -> str:
  """FLOPs per step and per device for every global batch of the tables."""
  rows = []
  for b in sorted({b for bs in sm.BATCHES.values() for b in bs}):
    fwd = flops.forward_flops(config, b)
    step = flops.train_step_flops(config, b)
    local = fwd.get("gla_local", 0.0) + fwd.get("gla_global", 0.0)
    per_dev = [f"{step / n / 1e12:,.2f}" if b >= n else "-" for n in sm.DEVICES]
    rows.append([
        f"{b:,}", f"{step / 1e15:,.3f}", f"{fwd['total'] / b / 1e9:,.1f}",
        f"{local / fwd['total']:.1%}"
    ] + per_dev)
  return _table(
      ["global batch", "PFLOP / step", "forward GFLOP / example", "GLA contrastive share"] +
      [f"TFLOP / device, N={n}" for n in sm.DEVICES], rows)


def hlo_table(inputs: sm.Inputs, hlo: dict) -> str:
  """Measured collective result bytes (shallow base config, batch 16, 8 CPU devices) against the
  analytic ones."""
  config = sm.shallow_config(inputs.config)
  leaves = sm.param_leaves(config)
  total = sum(x.size * x.itemsize for x in leaves)
  split = sum(x.size * x.itemsize for x in leaves if sm.split_over(x, inputs.rules, "fsdp"))
  mib = lambda v: f"{v / MIB:,.1f}"
  get = lambda f, k: mib(hlo[f].get(k, 0.0))
  rows = [
      [
          "gradient all-reduce (DP) / all-reduce + reduce-scatter (FSDP)",
          mib(total),
          get(1, "all-reduce param"),
          f"{get(8, 'all-reduce param')} + {get(8, 'reduce-scatter param')}"
      ],
      [
          "parameter all-gather (FSDP)", f"{mib(split)} (fsdp only)",
          get(1, "all-gather param"),
          get(8, "all-gather param")
      ],
      [
          "memory top-k scores all-gather",
          mib(sm.topk_gather_bytes(config, 16)),
          get(1, "all-gather other"),
          get(8, "all-gather other")
      ],
      [
          "GLA embeddings (gather + scatter) and small tensors",
          mib(2 * sm.gla_gather_bytes(config, 16)), f"{get(1, 'all-reduce other')} (all-reduce)",
          f"{get(8, 'all-reduce other')} (all-reduce) + {get(8, 'all-to-all other')} (all-to-all)"
      ],
  ]
  return _table([
      "collective (result bytes, whole step)", "analytic MiB", "XLA:CPU MiB, DP (8, 1, 1)",
      "XLA:CPU MiB, FSDP (1, 8, 1)"
  ], rows, "lrrr")


def hardware_table() -> str:
  """The hardware assumptions of scaling_model.HARDWARE."""
  rows = []
  for hw in sm.HARDWARE.values():
    table_peak = flops.PEAK_TFLOPS[hw.device_kind]["bfloat16"]
    rows.append([
        hw.name, f"{hw.peak_tflops:g} (flops.PEAK_TFLOPS: {table_peak:g})", f"{hw.hbm_gib:g}",
        hw.domain, f"{hw.fast} {hw.fast_gbs:g} GB/s, "
        f"{hw.fast_alpha_us:g} us", f"{hw.slow} {hw.slow_gbs:g} GB/s, "
        f"{hw.slow_alpha_us:g} us"
    ])
  return _table([
      "device", "peak bf16 TFLOP/s", "HBM GiB", "fast domain (devices)",
      "fast link: per device per direction, latency per step",
      "between domains: per device per direction, latency per step"
  ], rows, "lrrrll")


def step_table(rows: list[dict], hw: sm.Hardware) -> str:
  """Every step_row of one hardware."""
  out = []
  for r in (r for r in rows if r["hw"] is hw):
    lo, hi = r["step_ms"]
    fits = "yes" if r["fits"] else "**no**"
    fits += "" if r["fits_asis"] else " (as is: no)"
    out.append([
        r["n"],
        _layout(r) + (" ⚠uneven" if r["uneven"] else ""), f"{r['batch']:,}", r["per_dev"],
        f"{r['tflop']:.2f}", f"{r['compute_ms']:.1f}",
        f"{r['mem_gib']:.1f} / {r['mem_asis_gib']:.1f}", fits,
        f"{r['param_gb']:.2f} ({r['slow_gb']:.2f})", f"{r['gla_gb']:.2f}", f"{r['topk_gb']:.1f}",
        f"{r['comm_ms']:.1f} / {r['comm_asis_ms']:.1f}",
        f"**{r['ratio']:.2f}** / {r['ratio_asis']:.2f}", f"{r['block_ratio']:.2f}",
        f"{lo:.0f}-{hi:.0f}", f"{r['ex_s']:,.0f}"
    ])
  return _table([
      "N", "mesh (data, fsdp, tensor)", "global batch", "per dev", "TFLOP/dev", "compute ms",
      "memory GiB/dev (top-k fixed / as is)", f"fits {hw.hbm_gib:g} GiB",
      "params+grads GB/dev (slow link)", "GLA GB/dev", "top-k GB/dev (as is)",
      "comm ms (fixed / as is)", "comm / compute (fixed / as is)", "ViT-block comm / compute",
      "step ms (overlapped-serial)", "examples/s"
  ], out, "rlrrrrrlrrrrrrrr")


def tables(inputs: sm.Inputs, rows: list[dict], measured: Optional[dict] = None,
           recorded: frozenset = frozenset(), hlo: Optional[dict] = None) -> dict[str, str]:
  """The document's tables by marker name.

  Args:
    inputs: the step model's inputs.
    rows: scaling_model.all_rows(inputs).
    measured: XLA temp bytes per remat policy and batch; None: no 'activations' table.
    recorded: the remat policies in `measured` taken from scaling_model.RECORDED.
    hlo: hlo_collectives per fsdp (1 and 8); None: no 'collectives-xla' table.

  Returns:
    Markdown table per name, in document order.
  """
  out = {
      "summary": summary_table(rows),
      "parameters": params_table(inputs),
      "state": state_table(inputs),
  }
  if measured is not None:
    out["activations"] = activations_table(measured, set(recorded))
  out["flops"] = flops_table(inputs.config)
  if hlo is not None:
    out["collectives-xla"] = hlo_table(inputs, hlo)
  out["hardware"] = hardware_table()
  for key, hw in sm.HARDWARE.items():
    out[f"steps-{key}"] = step_table(rows, hw)
  return out


# --- the document's markers -----------------------------------------------------------------------
# A marker is a line of its own (a marker quoted inside a line of text is not one).
_OPEN = re.compile(r"^<!-- scaling-table:([\w-]+) -->$", re.M)
_BLOCK = re.compile(r"^<!-- scaling-table:([\w-]+) -->\n(.*?)^<!-- /scaling-table:\1 -->$",
                    re.M | re.S)


def _block(name: str, table: str) -> str:
  return f"<!-- scaling-table:{name} -->\n\n{table.strip()}\n\n<!-- /scaling-table:{name} -->"


def read_tables(doc: str) -> dict[str, str]:
  """The tables between the markers of a document, by name.

  Args:
    doc: the Markdown text.

  Returns:
    The text between each pair of markers, without the blank lines around it.

  Raises:
    ValueError: a marker without its closing marker, or a name marked twice.
  """
  found = {}
  for match in _BLOCK.finditer(doc):
    if match.group(1) in found:
      raise ValueError(f"scaling-table:{match.group(1)} is marked twice")
    found[match.group(1)] = match.group(2).strip("\n")
  unclosed = [name for name in _OPEN.findall(doc) if name not in found]
  if unclosed or len(_OPEN.findall(doc)) != len(found):
    raise ValueError(f"scaling-table markers without their closing marker: {unclosed}")
  return found


def replace_tables(doc: str, new: dict[str, str]) -> str:
  """The document with the tables named in `new` replaced between their markers; every other
  character (the text, the tables not in `new`) is kept.

  Raises:
    ValueError: a table in `new` has no markers in the document (or read_tables' errors).
  """
  missing = sorted(set(new) - set(read_tables(doc)))
  if missing:
    raise ValueError(f"no scaling-table markers for {missing} in the document")
  return _BLOCK.sub(
      lambda m: _block(m.group(1), new[m.group(1)]) if m.group(1) in new else m.group(0), doc)


def _format(value) -> str:
  if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
    return f"{int(value):,}"
  return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


# --- the command ----------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
  """Measures, runs the model and writes, prints or checks the document's tables.

  Args:
    argv: the arguments (default: sys.argv[1:]).

  Returns:
    The exit status: 1 if --check found tables that differ, else 0.
  """
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="base", help="variant of configs/pretrain.py")
  parser.add_argument("--batches", default="2,8",
                      help="per-device batch sizes to compile on one CPU device for the fit")
  parser.add_argument("--remat", default="none", help="comma-separated model.remat policies")
  parser.add_argument(
      "--no_measure", action="store_true",
      help="no base compile: use the XLA temp bytes recorded in RECORDED and keep the "
      "document's activations table")
  parser.add_argument(
      "--no_hlo", action="store_true",
      help="skip the 8-device HLO check and keep the document's collectives-xla table")
  parser.add_argument("--mfu", type=float, default=0.45, help="assumed model FLOPs utilisation")
  parser.add_argument("--efficiency", type=float, default=0.8,
                      help="achieved fraction of nominal link bandwidth")
  parser.add_argument("--doc", default=DOC,
                      help="the Markdown with the scaling-table markers (read; see --write)")
  parser.add_argument(
      "--write", default="", help="write the document with regenerated tables here (default: "
      "print it); an existing file's own text and markers are used, else --doc's")
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if the document's tables differ from these")
  parser.add_argument("--figures", action="store_true",
                      help="print the derived numbers the document's text quotes")
  args = parser.parse_args(argv)

  t0 = time.perf_counter()
  config = get_config(args.config)
  config.model.dtype = "bfloat16"  # the compute dtype the recommendations assume
  leaves = sm.param_leaves(config)
  rules = dict(sharding.rules(config.mesh))
  measured, recorded = {}, set()
  for remat in args.remat.split(","):
    if args.no_measure:
      measured[remat], _ = sm.RECORDED[remat], recorded.add(remat)
    else:
      fp32 = ml_collections.ConfigDict(config.to_dict())
      fp32.model.dtype = "float32"  # XLA:CPU shows no bf16 saving (docs/scaling_model.md)
      measured[remat] = measure_temp(fp32, [int(b) for b in args.batches.split(",")], remat)
  if "full" not in measured:
    measured["full"], _ = sm.RECORDED["full"], recorded.add("full")
  inputs = sm.Inputs(config, leaves, rules, sm.linear_fit(measured["none"]), args.mfu,
                     args.efficiency)
  hlo = None
  if not args.no_hlo and len(jax.devices()) >= 8:
    hlo = {f: hlo_collectives(sm.shallow_config(config), f) for f in (1, 8)}
  rows = sm.all_rows(inputs)
  new = tables(inputs, rows, None if args.no_measure else measured, frozenset(recorded), hlo)
  kept = [name for name in MEASURED_TABLES if name not in new]
  if kept:
    print(f"not measured, kept as they are: {', '.join(kept)}", file=sys.stderr)

  source = args.write if args.write and os.path.exists(args.write) else args.doc
  with open(source) as f:
    doc = f.read()
  status = 0
  if args.figures:
    for key, value in sm.figures(inputs, rows, measured, hlo).items():
      print(f"{key}: {_format(value)}")
  if args.check:
    old = read_tables(doc)
    for name, table in new.items():
      if old.get(name, "").strip() != table.strip():
        status = 1
        sys.stderr.writelines(
            difflib.unified_diff((old.get(name, "") + "\n").splitlines(True),
                                 (table + "\n").splitlines(True), f"{source} ({name})",
                                 f"regenerated ({name})"))
    print(f"{source}: tables {'differ' if status else 'are current'} ({', '.join(new)})",
          file=sys.stderr)
  else:
    doc = replace_tables(doc, new)
    if args.write:
      os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
      with open(args.write, "w") as f:
        f.write(doc)
      print(f"wrote {args.write}", file=sys.stderr)
    elif not args.figures:
      print(doc, end="")
  print(f"total wall time {time.perf_counter() - t0:.0f}s", file=sys.stderr)
  return status


if __name__ == "__main__":
  sys.exit(main())
