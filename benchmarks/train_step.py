"""Speed of the full MPMA pre-training step: JAX (mpma_jax.train) next to PyTorch, in one run.

  python benchmarks/train_step.py --config tiny|small|base --batch N [--steps 20] [--warmup 3]
      [--rounds 5] [--dtype float32|bfloat16] [--features_from clean|masked]
      [--compare_features_from] [--torch eager,compile[,amp,compile_amp]] [--no_torch]
      [--set key=value ...] [--jax_variant name:key=value,... ...] [--peak_size 2048]
      [--json out.json]

JAX: the jitted step of train.make_train_step (both passes, all losses, AdamW, non-finite guard),
compiled ahead of time on a one-device mesh (1, 1, 1), timed with jax.block_until_ready per step.
PyTorch: benchmarks/torch_reference.py (the same model, losses and AdamW), eagerly and under
torch.compile (a failure is reported as a row, not raised), with bfloat16 autocast (amp) on GPU
only. Both start from the same parameters and see the same batch (random pixels and ids, real
masks), on the same device.

Timing: after --warmup steps of every variant, --rounds rounds each run every variant for
steps / rounds steps in turn, so that a noisy, shared machine slows all of them alike; the figure
is the median step time over all rounds. The minimum is reported too, the median CPU time of the
process per step (all threads; on a shared machine it moves less than the wall time, but spinning
worker threads count in it), and the machine's runnable threads during the steps (more than the
cores: the step shared the CPU with other work).

Also printed: analytic FLOPs per step (flops.py, model FLOPs = 3 x forward) next to XLA's
cost_analysis() of the compiled step, TFLOP/s and MFU. The peak for MFU is flops.peak_flops on a
GPU / TPU; on a CPU it is measured in the same run, as the TFLOP/s of a jitted [n, n] x [n, n]
matmul in the compute dtype (--peak_size n), with PyTorch's torch.mm rate beside it. Ends with a
Markdown table and one JSON line.

--set changes the config of every variant; --jax_variant adds a JAX row with its own overrides,
timed in the same rounds (config choices: --jax_variant gather:model.memory.impl=gather). An
override whose key starts with 'xla_' is an XLA compiler option of that JAX step instead
(Lowered.compile(compiler_options=...)), so XLA options too are compared within one process:
--jax_variant noynn:xla_cpu_experimental_ynn_fusion_type= (empty: no YNNPACK fusions).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import torch

# Run as a script: the repository root on sys.path, for configs/ and benchmarks.*
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import torch_reference
from mpma_jax import flops, logger, optim, sharding, train
from mpma_jax import overrides as overrides_lib
from mpma_jax.configs.pretrain import get_config
from mpma_jax.interop import torch_mpma
from mpma_jax.models.mpma import MPMA

TORCH_VARIANTS = ("eager", "compile", "amp", "compile_amp")


# --- config ---------------------------------------------------------------------------------------
def compiler_options(overrides: list[str]) -> dict:
  """The XLA options among overrides ('xla_cpu_enable_fast_math=True'), for Lowered.compile; '+'
  in a value stands for ',' (which separates overrides): xla_cpu_experimental_ynn_fusion_type=
  LIBRARY_FUSION_TYPE_DOT+LIBRARY_FUSION_TYPE_REDUCE."""
  options = dict(overrides_lib.parse(o) for o in overrides if o.startswith("xla_"))
  return {k: v.replace("+", ",") if isinstance(v, str) else v for k, v in options.items()}


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """'a.b.c=value' strings -> config fields (overrides.apply); XLA options ('xla_...', see
  compiler_options) are skipped."""
  overrides_lib.apply_all(config, [o for o in overrides if not o.startswith("xla_")], "--set")


def bench_config(config: ml_collections.ConfigDict, batch: int, dtype: str,
                 features_from: str) -> ml_collections.ConfigDict:
  """A copy of config for one device: batch, dtype, gla.features_from, mesh (1, 1, 1)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = batch
  config.model.dtype = dtype
  config.model.gla.features_from = features_from
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


# --- JAX ------------------------------------------------------------------------------------------
def _cost_flops(compiled) -> Optional[float]:
  """XLA's FLOP count of a compiled computation (None if the backend gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


class JaxStep:
  """The compiled JAX train step on one device, its state and one batch on that device;
  xla_options: XLA compiler options for this compilation only; compiled: the step's executable
  compiled elsewhere for this device (aot.compile_step(config, 'local:1')), run instead."""
  def __init__(self, config: ml_collections.ConfigDict, batch: dict, device,
               xla_options: Optional[dict] = None, compiled: Any = None):
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, [device])
    rules = sharding.rules(config.mesh)
    model = MPMA.from_config(config)
    tx = optim.make_optimizer(config)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
      self.state, shardings = train.create_train_state(config, model, tx, self.mesh, rules)
      self.initial_params = jax.device_get(self.state.params)  # before donation
      self.batch = sharding.global_batch(batch, self.mesh)
      self.compiled, self.compile_s = compiled, 0.0
      if compiled is None:
        step = train.make_train_step(config, model, tx, shardings, self.mesh)
        t = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch).compile(xla_options or None)
        self.compile_s = time.perf_counter() - t
    self.xla_flops = _cost_flops(self.compiled)
    self.metrics = None

  def __call__(self):
    self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, self.metrics))


# --- PyTorch --------------------------------------------------------------------------------------
class TorchStep:
  """One PyTorch variant: its own copy of the model, optimizer and the batch on `device`."""
  def __init__(self, config: ml_collections.ConfigDict, params: Any, batch: dict, device: str,
               variant: str):
    if variant not in TORCH_VARIANTS:
      raise ValueError(f"unknown PyTorch variant {variant!r}; expected one of {TORCH_VARIANTS}")
    self.device = device
    model = torch_mpma.MPMATorch.from_params(params, config.model).to(device)
    self.step = torch_reference.make_torch_step(config, model, compile="compile" in variant,
                                                amp="amp" in variant)
    self.batch = torch_reference.to_torch(batch, device)
    self.metrics = None

  def __call__(self):
    self.metrics = self.step(self.batch)
    torch_reference.synchronize(self.device)


def compiler_status() -> str:
  """What torch.compile's CPU backend (Inductor) needs: a C++ compiler."""
  cxx = os.environ.get("CXX", "g++")
  found = shutil.which(cxx) or shutil.which("c++") or shutil.which("clang++")
  return f"C++ compiler: {found}" if found else "no C++ compiler on PATH (Inductor needs one)"


# --- peaks ----------------------------------------------------------------------------------------
def _median_time(fn: Callable[[], Any], reps: int) -> float:
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_tflops(n: int, dtype: str, reps: int = 10) -> dict:
  """TFLOP/s of one [n, n] x [n, n] matmul: jitted JAX and torch.mm, on the default devices."""
  jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  a = jax.random.normal(jax.random.key(0), (n, n), jdt)
  b = jax.random.normal(jax.random.key(1), (n, n), jdt)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  out = {"jax": 2.0 * n**3 / _median_time(lambda: f(a, b).block_until_ready(), reps) / 1e12}
  tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  ta = torch.randn(n, n, dtype=tdt)
  tb = torch.randn(n, n, dtype=tdt)
  torch.mm(ta, tb)
  out["torch"] = 2.0 * n**3 / _median_time(lambda: torch.mm(ta, tb), reps) / 1e12
  return out


# --- the benchmark --------------------------------------------------------------------------------
def runnable_threads() -> Optional[int]:
  """Threads running or waiting for a CPU on this machine now (ours included), from
  /proc/loadavg; more than the cores means the step competed for them. None off Linux."""
  try:
    with open("/proc/loadavg") as f:
      return int(f.read().split()[3].split("/")[0])
  except (OSError, IndexError, ValueError):
    return None


def time_variants(variants: dict, steps: int, warmup: int, rounds: int, log: Callable[[str], None],
                  load: Optional[dict] = None, cpu: Optional[dict] = None) -> dict:
  """{name: callable} -> {name: per-step seconds}; warm-up, then interleaved rounds. `load`, if
  given, receives {name: [runnable threads sampled before each timed step]}, `cpu` {name: [CPU
  seconds of this process (all its threads) per step]}."""
  times = {name: [] for name in variants}
  samples = {name: [] for name in variants}
  cpu_times = {name: [] for name in variants}
  for name, fn in variants.items():
    t = time.perf_counter()
    for _ in range(warmup):
      fn()
    log(f"  warm-up {name}: {warmup} steps in {time.perf_counter() - t:.1f}s")
  per_round = max(1, -(-steps // rounds))
  for r in range(rounds):
    for name, fn in variants.items():
      for _ in range(per_round):
        samples[name].append(runnable_threads())
        c, t = time.process_time(), time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
        cpu_times[name].append(time.process_time() - c)
    log(f"  round {r + 1}/{rounds}: " +
        ", ".join(f"{k} {statistics.median(v[-per_round:]):.3f}s" for k, v in times.items()))
  if load is not None:
    load.update(samples)
  if cpu is not None:
    cpu.update(cpu_times)
  return times


def markdown_table(rows: list[dict]) -> str:
  lines = [
      "| variant | features_from | median step s | min step s | CPU s / step | examples/s | "
      "TFLOP/s | MFU | time / JAX |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  ]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['variant']} | {r['features_from']} | {r['error']} | | | | | | |")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    lines.append(f"| {r['variant']} | {r['features_from']} | {r['median_s']:.4f} | "
                 f"{r['min_s']:.4f} | {r['median_cpu_s']:.3f} | {r['examples_per_s']:.1f} | "
                 f"{r['tflops']:.3f} | {mfu} | {r['time_vs_jax']:.2f} |")
  return "\n".join(lines)


def benchmark(config: ml_collections.ConfigDict, args: argparse.Namespace,
              log: Callable[[str], None] = print) -> dict:
  """Runs every requested variant on `config` (a pre-training config) and prints the results.
  Returns the summary (also printed as one JSON line)."""
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  torch_device = {"cpu": "cpu", "gpu": "cuda"}.get(device.platform)
  torch_variants = [] if args.no_torch else _torch_variants(args.torch, on_cpu)
  if torch_variants and (torch_device is None or
                         (torch_device == "cuda" and not torch.cuda.is_available())):
    raise SystemExit(f"JAX runs on {device.platform} but PyTorch cannot run there (a CUDA build "
                     "is needed on a GPU): pass --no_torch")
  if on_cpu:
    torch.set_num_threads(torch_reference.num_threads())
  elif torch_device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # as JAX's default float32 matmul precision
    torch.backends.cudnn.allow_tf32 = True

  cpu_model = logger.cpu_model()
  log(f"config={config.variant} batch={args.batch} dtype={args.dtype} device={device.device_kind} "
      f"({device.platform}; {cpu_model}, {os.cpu_count()} cores) jax {jax.__version__} "
      f"torch {torch.__version__} threads={torch.get_num_threads()}; {compiler_status()}")
  peak = flops.peak_flops(device, args.dtype)
  mm = None
  if on_cpu:
    mm = matmul_tflops(args.peak_size, args.dtype)
    peak = mm["jax"] * 1e12
    log(f"CPU peak = jitted {args.peak_size}^3 {args.dtype} matmul: JAX {mm['jax']:.3f} TFLOP/s "
        f"(torch.mm {mm['torch']:.3f} TFLOP/s)")

  batch = torch_reference.random_batch(config, args.batch, seed=args.seed)
  variants, rows, meta, order = {}, [], {}, []
  for name, ff, overrides, baseline in jax_variants(args):
    order.append(name)
    cfg = bench_config(config, args.batch, args.dtype, ff)
    apply_overrides(cfg, overrides)
    step_flops = flops.train_step_flops(cfg, args.batch)
    jstep = JaxStep(cfg, batch, device, compiler_options(args.set + overrides))
    ratio = jstep.xla_flops / step_flops if jstep.xla_flops else float("nan")
    log(f"{name}: compiled in {jstep.compile_s:.1f}s; FLOPs/step analytic {step_flops:.4g}, "
        f"XLA cost_analysis {jstep.xla_flops or float('nan'):.4g} (XLA / analytic {ratio:.3f})")
    t = time.perf_counter()
    jstep()  # every variant takes one untimed first step, so all run the same number of steps
    variants[name] = jstep
    meta[name] = {
        "features_from": ff, "flops": step_flops, "xla_flops": jstep.xla_flops,
        "compile_s": jstep.compile_s, "first_step_s": time.perf_counter() - t, "impl": "jax",
        "jax_name": baseline, "overrides": overrides
    }
    if overrides or (ff != args.features_from and not args.compare_torch):
      continue  # PyTorch runs next to the JAX baseline(s) only
    for tv in torch_variants:
      tname = f"torch {tv}" + (name[3:] if name != "jax" else "")
      order.append(tname)
      if tv in ("amp", "compile_amp") and on_cpu:
        rows.append({"variant": tname, "features_from": ff, "error": "skipped: AMP on GPU only"})
        continue
      try:
        tstep = TorchStep(cfg, jstep.initial_params, batch, torch_device, tv)
        t = time.perf_counter()
        tstep()  # the first call compiles under torch.compile
      except Exception as e:  # pylint: disable=broad-except
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        log(f"{tname}: failed: {reason}")
        rows.append({"variant": tname, "features_from": ff, "error": f"failed: {reason}"})
        continue
      variants[tname] = tstep
      meta[tname] = {
          "features_from": ff, "flops": step_flops, "impl": "torch", "jax_name": name,
          "first_step_s": time.perf_counter() - t
      }

  load = {}
  cpu = {}
  times = time_variants(variants, args.steps, args.warmup, args.rounds, log, load, cpu)
  medians = {k: statistics.median(v) for k, v in times.items()}
  losses = {k: float(v.metrics["loss"]) for k, v in variants.items()}  # after equal step counts
  for name, t in medians.items():
    m = meta[name]
    tput = flops.throughput(m["flops"], t, 1, peak)
    rows.append({
        "variant": name, "features_from": m["features_from"], "median_s": t,
        "examples_per_s": args.batch / t, "tflops": tput["tflops_per_device"],
        "mfu": tput.get("mfu"), "time_vs_jax": t / medians[m["jax_name"]],
        "min_s": min(times[name]), "steps": len(times[name]
                                               ), "median_cpu_s": statistics.median(cpu[name]),
        "final_loss": losses[name], "overrides": m.get("overrides",
                                                       []), "runnable_threads": _mean(load[name]),
        **{k: m[k] for k in ("xla_flops", "compile_s", "first_step_s") if k in m}
    })
  rows.sort(key=lambda r: order.index(r["variant"]))
  log("final loss per variant: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
  if any(_mean(v) is not None for v in load.values()):
    log(f"runnable threads during the timed steps (mean; {os.cpu_count()} cores; more = the "
        "machine was shared): " + ", ".join(f"{k} {_mean(v):.1f}" for k, v in load.items()))
  log("\n" + markdown_table(rows) + "\n")
  summary = {
      "config": config.variant, "batch": args.batch, "dtype": args.dtype,
      "device": device.device_kind, "platform": device.platform, "cpu": cpu_model,
      "cores": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
      "peak_tflops": peak / 1e12 if peak else None, "matmul_tflops": mm,
      "flops_per_step": {k: m["flops"] for k, m in meta.items() if m["impl"] == "jax"}, "rows": rows
  }
  log(json.dumps(summary))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def _mean(values: list) -> Optional[float]:
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def jax_variants(args: argparse.Namespace) -> list[tuple[str, str, list[str], str]]:
  """(name, features_from, config overrides, name of the baseline it is compared with) of every
  JAX row: the baseline ('jax', or 'jax clean' and 'jax masked'), then each --jax_variant."""
  froms = ["clean", "masked"] if args.compare_features_from else [args.features_from]
  names = [f"jax {ff}" if len(froms) > 1 else "jax" for ff in froms]
  out = [(name, ff, [], name) for name, ff in zip(names, froms)]
  baseline = out[froms.index(args.features_from)][0]
  for spec in args.jax_variant:
    label, sep, sets = spec.partition(":")
    if not sep or not label or not sets:
      raise SystemExit(f"--jax_variant expects NAME:key=value[,key=value], got {spec!r}")
    out.append((f"jax {label}", args.features_from, sets.split(","), baseline))
  return out


def _torch_variants(spec: str, on_cpu: bool) -> list[str]:
  if spec == "auto":
    return ["eager", "compile"] if on_cpu else list(TORCH_VARIANTS)
  names = [s.strip() for s in spec.split(",") if s.strip()]
  unknown = [n for n in names if n not in TORCH_VARIANTS]
  if unknown:
    raise SystemExit(f"--torch: unknown variant(s) {unknown}; expected {TORCH_VARIANTS}")
  return names


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="tiny", help="variant of configs/pretrain.py")
  p.add_argument("--batch", type=int, default=32, help="global batch (one device)")
  p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
  p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--features_from", default="clean", choices=("clean", "masked"))
  p.add_argument("--compare_features_from", action="store_true",
                 help="time the JAX step with gla.features_from = clean and = masked")
  p.add_argument("--compare_torch", action="store_true",
                 help="with --compare_features_from: PyTorch for both settings too")
  p.add_argument(
      "--torch", default="auto",
      help="comma-separated PyTorch variants among eager, compile, amp, compile_amp "
      "(auto: eager,compile on CPU, all four on GPU)")
  p.add_argument("--no_torch", action="store_true", help="JAX only")
  p.add_argument(
      "--jax_variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
      help="one more JAX row with these config overrides, e.g. "
      "gather:model.memory.impl=gather (repeatable)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.memory.impl=gather (repeatable)")
  p.add_argument("--peak_size", type=int, default=2048, help="CPU peak: matmul size n")
  p.add_argument("--seed", type=int, default=0, help="batch seed")
  p.add_argument("--json", default="", help="also write the summary here")
  args = p.parse_args(argv)
  if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.batch < 1:
    p.error("need --steps >= 1, --rounds >= 1, --warmup >= 0, --batch >= 1")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  config = get_config(args.config)
  apply_overrides(config, args.set)
  return benchmark(config, args)


if __name__ == "__main__":
  main()
