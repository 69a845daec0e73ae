"""The metric writer of pre-training and fine-tuning: console lines, TensorBoard scalars and
<workdir>/metrics.jsonl (process 0 only), interval summaries and throughput."""
import dataclasses
import json
import os
import platform
from typing import Any

import jax
import ml_collections
import numpy as np
from tensorboardX import SummaryWriter

from mpma_jax import flops
from mpma_jax.losses import LOSS_NAMES


@dataclasses.dataclass
class Logger:
  """Console lines and TensorBoard scalars (process 0 only)."""
  workdir: str
  writer: Any = None

  def __post_init__(self):
    if jax.process_index() == 0:
      self.writer = SummaryWriter(os.path.join(self.workdir, "tb"))

  def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
    """TensorBoard scalars, and one JSON line per call in <workdir>/metrics.jsonl."""
    if self.writer is None:
      return
    for k, v in values.items():
      self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
    self.writer.flush()
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(
          json.dumps({"step": step, "split": prefix, **{k: float(v) for k, v in values.items()}}) +
          "\n")

  def print(self, line: str) -> None:
    if jax.process_index() == 0:
      print(line, flush=True)


COUNTERS = ("bad_image", "truncated")  # data counters, summed over the run (metrics data_<name>)


def resume_counters(workdir: str, step: int) -> dict[str, int]:
  """The data counters of a run resumed at `step`: those of its last train line in metrics.jsonl
  at or before that step (0 without one), so that they keep counting over the whole run."""
  counts, last = {k: 0 for k in COUNTERS}, -1
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return counts
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a hard kill
        continue
      if row.get("split") == "train" and last <= row.get("step", -1) <= step:
        last = row["step"]
        counts = {k: int(row.get(f"data_{k}", 0)) for k in COUNTERS}
  return counts


def format_metrics(metrics: dict) -> str:
  keys = [k for k in ("loss", *LOSS_NAMES, "mlm_acc", "itm_acc") if k in metrics]
  line = " ".join(f"{k}={metrics[k]:.4f}" for k in keys)
  counts = [
      f"{k[5:]}={int(metrics[k])}" for k in ("data_bad_image", "data_truncated") if metrics.get(k)
  ]  # shown once non-zero
  if metrics.get("nonfinite_steps"):
    counts.append(f"nonfinite_steps={int(metrics['nonfinite_steps'])}")
  return " ".join([line] + counts)


def summarise(host_metrics: list[dict]) -> dict:
  """Per-step metrics of one log interval (on the host) -> interval means; steps whose loss was
  not finite are left out of the means and counted in 'nonfinite_steps'."""
  good = [m for m in host_metrics if not m["nonfinite"]] or host_metrics
  out = {
      k: float(np.mean([m[k] for m in good])) for k in host_metrics[0]
      if k != "nonfinite" and not k.startswith("data_")
  }
  out["nonfinite_steps"] = float(sum(int(m["nonfinite"]) for m in host_metrics))
  return out


class Throughput:
  """examples/s, model TFLOP/s per device and MFU over a log interval (analytic FLOPs, flops.py;
  peak per device from train.peak_tflops or the device table; MFU is left out when unknown)."""
  def __init__(self, config: ml_collections.ConfigDict):
    self.batch = config.train.batch_size
    self.step_flops = flops.train_step_flops(config, self.batch)
    self.devices = jax.device_count()
    self.peak = flops.peak_flops(jax.devices()[0], config.model.dtype, config.train.peak_tflops)

  def __call__(self, steps: int, seconds: float) -> dict:
    out = {"examples_per_sec": steps * self.batch / seconds, "step_time": seconds / steps}
    out.update(flops.throughput(self.step_flops, seconds / steps, self.devices, self.peak))
    return {k: v for k, v in out.items() if v is not None}


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), or what the platform module knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def machine() -> str:
  """'<CPU model>, <n> cores, <platform> jax <version>': the machine a benchmark or study ran on."""
  return f"{cpu_model()}, {os.cpu_count()} cores, {jax.default_backend()} jax {jax.__version__}"
