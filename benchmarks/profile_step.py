"""Where the JAX pre-training step spends its time: a profiler trace of a few steps, top ops.

  python benchmarks/profile_step.py --config tiny --batch 32 [--steps 5] [--top 25]
      [--dtype float32|bfloat16] [--features_from clean|masked] [--set key=value ...]
      [--trace_dir DIR]

Compiles the step exactly as benchmarks/train_step.py does (one device, mesh (1, 1, 1)), runs two
untraced steps, then traces --steps steps under jax.profiler.trace (each step inside a
StepTraceAnnotation) and reads the .xplane.pb back with jax.profiler.ProfileData (no TensorBoard
needed). An op is one HLO instruction the runtime executed (a thunk on the CPU, a kernel on a GPU);
its self time is its duration minus that of ops nested in it (a while loop's body). Each op is
labelled with its phase and model part from the HLO metadata (op_name) of the compiled step:

  fwd / bwd   under jvp(MPMA) / transpose(jvp(MPMA)); the part is the Flax module
              (image_encoder, text_encoder, memory, fusion, gla, mim_decoder, mlm_head, ...)
  loss        the losses and the GLA local-similarity loop (lax.map) outside the module
  update      the rest of the step: gradient norm, AdamW, the non-finite guard

Prints the top ops by self time (ms per step, % of the step's wall time), the same time summed per
phase and part, and per op kind (on the CPU `fusion:custom` are YNNPACK matmul fusions,
`fusion:loop` elementwise / reduction fusions), and the trace directory (open it in TensorBoard or
Perfetto for the timeline). On a CPU ops may overlap (the runtime runs independent thunks
concurrently), so the percentages can add up to more than 100%.
"""
import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax

# Run as a script: the repository root on sys.path, for configs/ and benchmarks.*
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import torch_reference, train_step
from mpma_jax.configs.pretrain import get_config

STEP_NAME = "train_step"
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")
_KIND = re.compile(r"kind=(k\w+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_IN_MODULE = re.compile(r"\(MPMA\)+/")
_OPERAND = re.compile(r"%([\w.\-]+)")


def hlo_ops(hlo_text: str) -> dict:
  """Instruction name -> (opcode or fusion kind, metadata op_name) from a compiled HLO module.

  XLA leaves some instructions it creates without metadata (the `wrapped_reduce-window` ops that
  split a long reduction); those borrow the op_name of an operand that has one, else of an
  instruction that uses them, so that they count under the model part they belong to rather than
  under "update" (where they would hide, e.g., the memory's top-k search)."""
  out, operands, users = {}, {}, {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode, rest = m.groups()
    kind = _KIND.search(rest)
    op_name = _OP_NAME.search(rest)
    out[name] = (f"{opcode}:{kind.group(1)[1:].lower()}" if opcode == "fusion" and kind else opcode,
                 op_name.group(1) if op_name else "")
    operands[name] = _OPERAND.findall(rest.split(")", 1)[0])
    for operand in operands[name]:
      users.setdefault(operand, []).append(name)
  for name, (kind, op_name) in list(out.items()):
    if not op_name:
      near = [out[n][1] for n in operands[name] + users.get(name, []) if n in out and out[n][1]]
      out[name] = (kind, near[0] if near else "")
  return out


def label(op_name: str) -> tuple[str, str]:
  """HLO op_name metadata -> (phase, model part)."""
  if "transpose(jvp(" in op_name:
    phase = "bwd"
  elif "jvp(" in op_name:
    phase = "fwd"
  else:
    return "update", "grad norm / AdamW / guard"
  inside = _IN_MODULE.split(op_name, maxsplit=1)
  if len(inside) == 2:  # inside the module: its first submodule, else the method (MPMA.fuse)
    parts = inside[1].split("/")
    if parts[0].startswith("MPMA.") and len(parts) > 2:
      return phase, parts[1]
    return phase, parts[0] if len(parts) > 1 else "MPMA"
  return phase, "loss: GLA local loop" if "/while/" in op_name else "loss"


def _self_times(events: list) -> list[tuple[str, float]]:
  """[(name, start, end)] of one thread -> [(name, self seconds)], nesting by containment."""
  out, stack = [], []  # stack: [name, end, child time]
  for name, start, end in sorted(events, key=lambda e: (e[1], -e[2])):
    while stack and stack[-1][1] <= start:
      done = stack.pop()
      out.append((done[0], done[3] - done[2]))
      if stack:
        stack[-1][2] += done[3]
    stack.append([name, end, 0.0, end - start])
  while stack:
    done = stack.pop()
    out.append((done[0], done[3] - done[2]))
    if stack:
      stack[-1][2] += done[3]
  return out


def parse_trace(path: str, module_prefix: str = "jit_step_fn") -> dict:
  """xplane.pb -> {'ops': {name: self seconds summed}, 'steps': [step wall seconds]}."""
  data = jax.profiler.ProfileData.from_file(path)
  ops, steps = collections.Counter(), []
  for plane in data.planes:
    device_plane = plane.name.startswith("/device:")
    for line in plane.lines:
      events = []
      for e in line.events:
        start, dur = e.start_ns * 1e-9, e.duration_ns * 1e-9
        if e.name == STEP_NAME:
          steps.append(dur)
          continue
        stats = dict(e.stats)
        module = str(stats.get("hlo_module", ""))
        on_cpu = "hlo_op" in stats and module.startswith(module_prefix)
        on_device = device_plane and line.name == "XLA Ops"
        if on_cpu or on_device:
          events.append((str(stats.get("hlo_op", e.name)), start, start + dur))
      for name, t in _self_times(events):
        ops[name] += t
  return {"ops": ops, "steps": steps}


def report(parsed: dict, hlo: dict, num_steps: int, top: int) -> str:
  """Markdown tables: the top ops, and the time per (phase, part)."""
  step_s = sorted(parsed["steps"])[len(parsed["steps"]) // 2] if parsed["steps"] else float("nan")
  total = sum(parsed["ops"].values())
  pct = lambda t: 100.0 * t / num_steps / step_s
  lines = [
      f"step wall time (median of {len(parsed['steps'])} traced): {1e3 * step_s:.1f} ms; "
      f"op self time per step: {1e3 * total / num_steps:.1f} ms "
      f"({pct(total):.0f}% of the step; > 100% = ops overlapping)", "",
      "| op | kind | phase | part | ms / step | % of step | source (op_name) |",
      "|---|---|---|---|---:|---:|---|"
  ]
  for name, t in parsed["ops"].most_common(top):
    kind, op_name = hlo.get(name, ("?", ""))
    phase, part = label(op_name)
    source = op_name.replace("jit(step_fn)/", "")
    source = source if len(source) <= 70 else "..." + source[-67:]
    lines.append(f"| {name} | {kind} | {phase} | {part} | {1e3 * t / num_steps:.2f} | "
                 f"{pct(t):.1f} | {source} |")
  parts = collections.Counter()
  counts = collections.Counter()
  for name, t in parsed["ops"].items():
    key = label(hlo.get(name, ("?", ""))[1])
    parts[key] += t
    counts[key] += 1
  lines += ["", "| phase | part | ops | ms / step | % of step |", "|---|---|---:|---:|---:|"]
  for (phase, part), t in parts.most_common():
    lines.append(f"| {phase} | {part} | {counts[(phase, part)]} | {1e3 * t / num_steps:.2f} | "
                 f"{pct(t):.1f} |")
  kinds, kind_counts = collections.Counter(), collections.Counter()
  for name, t in parsed["ops"].items():
    kind = hlo.get(name, ("?", ""))[0]
    kinds[kind] += t
    kind_counts[kind] += 1
  lines += ["", "| kind | ops | ms / step | % of step |", "|---|---:|---:|---:|"]
  for kind, t in kinds.most_common():
    lines.append(f"| {kind} | {kind_counts[kind]} | {1e3 * t / num_steps:.2f} | {pct(t):.1f} |")
  return "\n".join(lines)


def profile(config, args) -> str:
  """Compiles, traces args.steps steps and returns the report."""
  cfg = train_step.bench_config(config, args.batch, args.dtype, args.features_from)
  batch = torch_reference.random_batch(cfg, args.batch, seed=0)
  step = train_step.JaxStep(cfg, batch, jax.devices()[0], train_step.compiler_options(args.set))
  print(f"compiled in {step.compile_s:.1f}s", flush=True)
  for _ in range(2):
    step()
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="mpma_profile_")
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # Python frames would add overhead and noise
  t = time.perf_counter()
  with jax.profiler.trace(trace_dir, profiler_options=options):
    for i in range(args.steps):
      with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=i):
        step()
  print(f"traced {args.steps} steps in {time.perf_counter() - t:.1f}s -> {trace_dir}")
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"the profiler wrote no .xplane.pb under {trace_dir}")
  parsed = parse_trace(files[-1])
  if not parsed["ops"]:
    raise RuntimeError(f"no ops of the train step found in {files[-1]}")
  return report(parsed, hlo_ops(step.compiled.as_text()), args.steps, args.top)


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="tiny", help="variant of configs/pretrain.py")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=5, help="traced steps")
  p.add_argument("--top", type=int, default=25, help="rows of the op table")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--features_from", default="clean", choices=("clean", "masked"))
  p.add_argument(
      "--set", action="append", default=[], metavar="KEY=VALUE",
      help="config override (--set model.gla.chunk=32) or XLA option "
      "(--set xla_cpu_enable_fast_math=True); repeatable")
  p.add_argument("--trace_dir", default="", help="where the trace goes (default: a temp dir)")
  args = p.parse_args(argv)
  config = get_config(args.config)
  train_step.apply_overrides(config, args.set)
  text = profile(config, args)
  print(text)
  return text


if __name__ == "__main__":
  main()
