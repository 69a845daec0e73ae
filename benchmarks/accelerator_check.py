"""One command for a GPU / TPU machine: the MPMA train step in bfloat16 and float32, next to its
PyTorch twin, against what XLA's compiled step and the roofline said it would need.

  python benchmarks/accelerator_check.py [--config base] [--batch 32] [--steps 10] [--warmup 1]
      [--rounds 5] [--budget_s 420] [--torch_compile] [--set key=value ...] [--json out.json]

On this process's first device, for each dtype in turn (bfloat16 first):
  JAX      the step of train.make_train_step compiled by aot.compile_step for 'local:1' (this
           device), run by train_step.JaxStep; median step time, examples/s, MFU against
           flops.peak_flops for the dtype;
  PyTorch  the twin (benchmarks/torch_reference.py) from the same parameters on the same batch:
           bf16 autocast (AMP) on a CUDA GPU, float32 eager on the CPU (autocast is GPU-only
           here), none on a TPU; timed in the same interleaved rounds (train_step.time_variants),
           with its step time over JAX's;
  memory   the measured peak (JAX: the device's peak_bytes_in_use; PyTorch:
           torch.cuda.max_memory_allocated) next to XLA's compiled peak (aot.report);
  roofline aot.report's estimated step time and MFU for this chip (aot.CHIPS; none on a CPU or a
           chip missing there) and measured / estimated.

--budget_s bounds the whole run: a pass that the time left cannot hold (judged by the pass before
it) is skipped, timed steps are cut to what fits, and what was measured is printed either way.
Progress goes to stderr; stdout gets one Markdown table and one JSON line.
"""
import os

# JAX would otherwise reserve 75% of GPU memory when it starts, leaving the PyTorch twin too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import gc
import json
import statistics
import sys
import time
from typing import Callable, Optional

import jax
import ml_collections
import torch

# Run as a script: the repository root on sys.path, for configs/ and benchmarks.*
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import torch_reference, train_step
from mpma_jax import aot, flops
from mpma_jax.configs.pretrain import get_config

DTYPES = ("bfloat16", "float32")
GiB = 1024**3


# --- devices --------------------------------------------------------------------------------------
def torch_twin(platform: str, torch_compile: bool) -> tuple[Optional[str], list[str], str]:
  """(PyTorch device, train_step.TORCH_VARIANTS to run, why none) for the platform JAX runs on."""
  if platform == "gpu":
    if not torch.cuda.is_available():
      return None, [], "PyTorch has no CUDA here (install a CUDA build of torch)"
    return "cuda", ["amp"] + (["compile_amp"] if torch_compile else []), ""
  if platform == "cpu":
    return "cpu", ["eager"] + (["compile"] if torch_compile else []), ""
  return None, [], f"no PyTorch twin on {platform}"


def torch_label(variant: str, torch_device: str) -> str:
  return {
      "amp": "PyTorch AMP (bf16 autocast)", "compile_amp": "PyTorch compile + AMP",
      "eager": f"PyTorch eager f32 ({torch_device}: no AMP)",
      "compile": f"PyTorch compile f32 ({torch_device}: no AMP)"
  }[variant]


def jax_peak_bytes(device) -> Optional[float]:
  """Most bytes the device has held since the process started (None where JAX does not say: CPU)."""
  stats = device.memory_stats() or {}
  return float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def torch_peak_bytes(torch_device: Optional[str]) -> Optional[float]:
  return float(torch.cuda.max_memory_allocated()) if torch_device == "cuda" else None


def torch_bytes_in_use(torch_device: Optional[str]) -> float:
  return float(torch.cuda.memory_allocated()) if torch_device == "cuda" else 0.0


# --- one dtype ------------------------------------------------------------------------------------
def run_dtype(config: ml_collections.ConfigDict, dtype: str, args: argparse.Namespace, device,
              time_left: Callable[[], float], log: Callable[[str], None]) -> list[dict]:
  """The JAX row and the PyTorch rows of one dtype (rows carry 'error' where a part did not run)."""
  cfg = train_step.bench_config(config, args.batch, dtype, config.model.gla.features_from)
  step_flops = flops.train_step_flops(cfg, args.batch)
  batch = torch_reference.random_batch(cfg, args.batch, seed=args.seed)
  torch_device, variants, no_twin = torch_twin(device.platform, args.torch_compile)

  # The step is compiled once, ahead of time: the executable that is timed is the one whose
  # memory and roofline aot.report gives (a second compile of `base` would cost minutes).
  compiled = aot.compile_step(cfg, "local:1", [device])
  rep = aot.report(cfg, compiled)
  compile_s = rep["lower_seconds"] + rep["compile_seconds"]
  jstep = train_step.JaxStep(cfg, batch, device, compiled=compiled.executable)
  t = time.perf_counter()
  jstep()
  first = {"jax": time.perf_counter() - t}
  log(f"{dtype}: JAX compiled in {compile_s:.1f} s, first step {first['jax']:.2f} s, XLA peak "
      f"{_bytes(rep['memory']['peak'])}")
  jax_row = {
      "dtype": dtype, "framework": "JAX", "compiled_peak_bytes": rep["memory"]["peak"],
      "estimate": rep["estimate"], "compile_s": compile_s, "flops": step_flops
  }
  rows = [jax_row]
  timed = {"jax": jstep}
  if not variants:
    rows.append({"dtype": dtype, "framework": "PyTorch", "error": f"skipped: {no_twin}"})
  for v in variants:
    label = torch_label(v, torch_device)
    if time_left() <= 0:
      rows.append({"dtype": dtype, "framework": label, "error": "skipped: over budget"})
      continue
    held = torch_bytes_in_use(torch_device)
    if torch_device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    try:
      tstep = train_step.TorchStep(cfg, jstep.initial_params, batch, torch_device, v)
      t = time.perf_counter()
      tstep()  # torch.compile compiles here
      first[v] = time.perf_counter() - t
      # The first step allocates all a step needs (optimizer state included); what the earlier
      # variants still hold is not this one's.
      peak = torch_peak_bytes(torch_device)
    except Exception as e:  # pylint: disable=broad-except
      reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
      log(f"{dtype}: {label} failed: {reason}")
      rows.append({"dtype": dtype, "framework": label, "error": f"failed: {reason}"})
      continue
    log(f"{dtype}: {label} first step {first[v]:.2f} s")
    timed[v] = tstep
    rows.append({
        "dtype": dtype, "framework": label, "variant": v, "flops": step_flops,
        "peak_bytes": None if peak is None else peak - held
    })

  # Warm-up here rather than in time_variants: its last step gives the pace at which the timed
  # steps are cut to what the time left holds (a first step can include torch.compile's minutes).
  pace = dict(first)
  for name, fn in timed.items():
    for _ in range(args.warmup):
      t = time.perf_counter()
      fn()
      pace[name] = time.perf_counter() - t
  per_step = sum(pace.values())
  steps = max(1, min(args.steps, int(time_left() / per_step))) if per_step > 0 else args.steps
  if steps < args.steps:
    log(f"{dtype}: {steps} timed steps instead of {args.steps} to stay within --budget_s")
  times = train_step.time_variants(timed, steps, 0, min(args.rounds, steps), log)

  jax_s = statistics.median(times["jax"])
  for row in rows:
    key = "jax" if row["framework"] == "JAX" else row.get("variant")
    if key not in times:
      continue
    median = statistics.median(times[key])
    amp = key in ("amp", "compile_amp")
    peak = flops.peak_flops(device, "bfloat16" if amp else dtype)
    tput = flops.throughput(step_flops, median, 1, peak)
    row.update(median_s=median, min_s=min(times[key]), steps=len(times[key]),
               examples_per_s=args.batch / median, tflops=tput["tflops_per_device"],
               mfu=tput.get("mfu"), first_step_s=first[key],
               final_loss=float(timed[key].metrics["loss"]))
    if key != "jax":
      row["torch_vs_jax"] = median / jax_s
  est = jax_row["estimate"]
  jax_row["peak_bytes"] = jax_peak_bytes(device)
  if est.get("step_s"):
    jax_row["measured_vs_estimate"] = jax_s / est["step_s"]
  return rows


# --- the check ------------------------------------------------------------------------------------
def check(
    config: ml_collections.ConfigDict, args: argparse.Namespace,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
) -> dict:
  """Runs both dtypes within args.budget_s; prints and returns the table and the summary."""
  start = time.perf_counter()
  time_left = lambda: args.budget_s - (time.perf_counter() - start)
  device = jax.devices()[0]
  torch_device, _, _ = torch_twin(device.platform, args.torch_compile)
  if torch_device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # as JAX's default float32 matmul precision
    torch.backends.cudnn.allow_tf32 = True
  elif torch_device == "cpu":
    torch.set_num_threads(torch_reference.num_threads())
  torch_name = torch.cuda.get_device_name(0) if torch_device == "cuda" else torch_device
  log(f"config={config.variant} batch={args.batch} on {device.device_kind} ({device.platform}); "
      f"PyTorch on {torch_name}; jax {jax.__version__}, torch {torch.__version__}; budget "
      f"{args.budget_s:.0f} s")

  rows, last_pass_s = [], 0.0
  for dtype in DTYPES:
    if last_pass_s and time_left() < last_pass_s:  # the first pass always runs
      why = f"skipped: {time_left():.0f} s left, the pass before took {last_pass_s:.0f} s"
      log(f"{dtype}: {why}")
      rows.append({"dtype": dtype, "framework": "JAX", "error": why})
      continue
    t = time.perf_counter()
    try:
      rows += run_dtype(config, dtype, args, device, time_left, log)
    except Exception as e:  # pylint: disable=broad-except
      # Out of memory, say: the other dtype may still run, and the table still prints.
      reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
      log(f"{dtype}: failed: {reason}")
      rows.append({"dtype": dtype, "framework": "JAX", "error": f"failed: {reason}"})
    last_pass_s = time.perf_counter() - t
    gc.collect()  # the pass's state and models, on both frameworks' devices, before the next
    if torch_device == "cuda":
      torch.cuda.empty_cache()

  total_s = time.perf_counter() - start
  header = (f"MPMA `{config.variant}` train step, batch {args.batch}, on {device.device_kind} "
            f"(JAX {device.platform}, jax {jax.__version__}); PyTorch on {torch_name} "
            f"(torch {torch.__version__}); {total_s:.0f} s in all")
  table = markdown_table(rows)
  print(f"\n{header}\n\n{table}\n\n{NOTES}\n")
  summary = {
      "config": config.variant, "batch": args.batch, "overrides": args.set,
      "device": device.device_kind, "platform": device.platform, "torch_device": torch_name,
      "jax": jax.__version__, "torch": torch.__version__, "total_s": total_s,
      "budget_s": args.budget_s, "rows": rows, "table": table
  }
  print(json.dumps(summary))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
  return summary


# --- printing -------------------------------------------------------------------------------------
COLUMNS = ("dtype", "step", "median step ms", "examples/s", "TFLOP/s", "MFU", "PyTorch / JAX",
           "peak memory", "XLA compiled peak", "roofline step ms", "measured / roofline")

NOTES = """\
* PyTorch / JAX: the PyTorch step's median time over JAX's, timed in the same rounds (> 1: JAX is
  faster). MFU: model FLOPs (flops.train_step_flops) against flops.peak_flops for the dtype the
  matmuls run in (bf16, or TF32 for float32 on NVIDIA); - where the device has no published peak.
* peak memory: measured. JAX's counter cannot be reset: the float32 JAX row's is the process's
  peak, the bfloat16 pass included. PyTorch's is what its step added to what was held before.
  XLA compiled peak and roofline: aot.report of the timed executable, compiled for 'local:1' (the
  roofline assumes the chip's bf16 peak for both dtypes; - on a CPU or a chip not in aot.CHIPS)."""


def _bytes(x: Optional[float]) -> str:
  if x is None:
    return "-"
  return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 1024 ** 2:.1f} MiB"


def markdown_table(rows: list[dict]) -> str:
  """One line per (dtype, framework); a part that did not run shows why."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['dtype']} | {r['framework']} | {r['error']} |" + " |" * 8)
      continue
    est = r.get("estimate") or {}
    cells = [
        r["dtype"],
        r["framework"],
        f"{1e3 * r['median_s']:.2f}",
        f"{r['examples_per_s']:.1f}",
        f"{r['tflops']:.3f}",
        f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
        f"{r['torch_vs_jax']:.2f}" if "torch_vs_jax" in r else "-",
        _bytes(r.get("peak_bytes")),
        _bytes(r.get("compiled_peak_bytes")),
        f"{1e3 * est['step_s']:.2f} (MFU {100 * est['mfu']:.1f}%)" if est else "-",
        f"{r['measured_vs_estimate']:.2f}" if "measured_vs_estimate" in r else "-",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="base", help="variant of configs/pretrain.py")
  p.add_argument("--batch", type=int, default=32, help="batch on the one device")
  p.add_argument("--steps", type=int, default=10, help="timed steps per row")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed steps per row after its first, before the timed ones")
  p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  p.add_argument("--budget_s", type=float, default=420.0, help="seconds for the whole run")
  p.add_argument("--torch_compile", action="store_true",
                 help="also torch.compile the PyTorch twin (minutes on `base`)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.scan=True (repeatable)")
  p.add_argument("--seed", type=int, default=0, help="batch seed")
  p.add_argument("--json", default="", help="also write the summary here")
  args = p.parse_args(argv)
  if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.batch < 1 or args.budget_s <= 0:
    p.error("need --steps >= 1, --rounds >= 1, --warmup >= 0, --batch >= 1, --budget_s > 0")
  unsupported = [o for o in args.set if o.startswith("xla_")]
  if unsupported:
    p.error(f"--set {unsupported[0]}: XLA options are train_step.py's (--jax_variant)")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  config = get_config(args.config)
  train_step.apply_overrides(config, args.set)
  return check(config, args)


if __name__ == "__main__":
  main()
