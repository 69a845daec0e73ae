"""Ahead-of-time compilation of the real train step for accelerators this machine does not have.

`compile_step` builds the same mesh, abstract state and `train.make_train_step` that training uses,
over *compile-only* devices (a TPU topology described by libtpu, e.g. 'v5e:4x4', or the local CPU
devices), lowers the step with ShapeDtypeStructs and lets XLA compile it for that target. From the
executable it reads XLA's own figures:

  memory      per-device arguments, outputs, temporaries, generated code (`memory_analysis`);
  cost        FLOPs and bytes accessed per device (`cost_analysis`);
  collectives every all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute in
              the compiled HLO, with bytes per step (loops multiplied by their trip counts).

`estimate` turns them into a step time with the roofline stated in `CHIPS` (compute at the chip's
peak, HBM traffic at its bandwidth, collectives at the interconnect bandwidth), and MFU against the
analytic model FLOPs (flops.py). Nothing runs on the target; nothing is allocated but host memory
for the compiler.
"""
import contextlib
import dataclasses
import gzip
import json
import math
import multiprocessing
import os
import pickle
import re
import sys
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from jax.experimental import serialize_executable, topologies
import ml_collections

from mpma_jax import flops, optim, sharding, train
from mpma_jax.data import pipeline
from mpma_jax.models.mpma import MPMA

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip (= one JAX device) as the roofline sees it."""
  name: str
  device_kind: str  # as jax.Device.device_kind says; its peak FLOP/s is in flops.PEAK_TFLOPS
  hbm_bytes: float  # memory per device
  hbm_gbps: float  # HBM bandwidth, GB/s
  link_gbps: float  # one-way bandwidth of one interconnect link, GB/s
  ring_links: int  # links a ring collective over one mesh axis drives at once (one-way)
  source: str

  def peak(self, dtype: str) -> float:
    """FLOP/s of the model's matmuls in the compute dtype (0 without a known peak: no roofline)."""
    return flops.peak_flops(self.device_kind, dtype) or 0.0


# Where each figure comes from. ICI: a ring along one torus axis sends in both directions, so it
# drives 2 links one-way; TPUs with more ports may do better for collectives over several axes,
# which this model ignores (conservative). NVLink 4: 18 links x 25 GB/s one-way through NVSwitch.
CHIPS = {
    "v5e": Chip(
        "TPU v5e", "TPU v5 lite", 16 * GiB, 819.0, 50.0, 2,
        "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM at 819 GB/s, "
        "400 GB/s bidirectional ICI per chip over 4 ports"),
    "v5p": Chip(
        "TPU v5p", "TPU v5", 95 * GiB, 2765.0, 100.0, 2,
        "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM at 2,765 GB/s, "
        "1,200 GB/s bidirectional ICI per chip over 6 ports"),
    "v4": Chip(
        "TPU v4", "TPU v4", 32 * GiB, 1200.0, 45.0, 2,
        "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM at 1,200 GB/s; ICI "
        "45 GB/s one-way per link, 6 links (jax-ml scaling book, 'How to think about TPUs')"),
    "v6e": Chip(
        "TPU v6e", "TPU v6 lite", 32 * GiB, 1640.0, 100.0, 2,
        "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1,640 GB/s, "
        "800 GB/s bidirectional ICI per chip over 4 ports"),
    "h100": Chip(
        "NVIDIA H100 SXM", "NVIDIA H100 80GB HBM3", 84978434048.0, 3350.0, 25.0, 18,
        "NVIDIA H100 datasheet: 989 TFLOP/s bf16 dense (495 TF32), 80 GB HBM3 at "
        "3.35 TB/s, NVLink 900 GB/s bidirectional (18 links)"),
    "cpu": Chip("CPU (host)", "cpu", 0.0, 0.0, 0.0, 0, "no roofline: compile check only"),
}
# Fixed cost per collective (launch and synchronisation): an assumption, not a measurement; it
# matters only for the many small collectives of small models.
COLLECTIVE_LATENCY_S = 5e-6

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                    "collective-permute")


# --- targets --------------------------------------------------------------------------------------
def parse_topology(topology: str) -> tuple[str, str]:
  """'v5e:4x4' -> ('v5e', '4x4'); 'cpu:8' -> ('cpu', '8'). Raises ValueError naming the value."""
  kind, _, shape = topology.partition(":")
  if (kind not in CHIPS and kind != "local") or not re.fullmatch(r"\d+(x\d+)*", shape):
    raise ValueError(f"--topology {topology!r}: expected <chip>:<shape> with chip one of "
                     f"{sorted(CHIPS)} or local, e.g. v5e:4x4, v5p:4x4x4, v4:2x2x4, cpu:8, h100:8, "
                     "local:1 (this machine's first device)")
  return kind, shape


# jax.Device.device_kind -> CHIPS key, for 'local:N' targets (the devices this process has): each
# chip's own kind, and other names of the same chips.
DEVICE_KINDS = {
    **{c.device_kind: key for key, c in CHIPS.items() if key != "cpu"}, "TPU v5e": "v5e",
    "TPU v5p": "v5p", "TPU v6e": "v6e", "NVIDIA H100": "h100", "NVIDIA H200": "h100"
}


def chip_for(topology: str, devices) -> "Chip":
  """The roofline's chip for a target; 'local' targets by their device kind (a GPU or TPU missing
  from DEVICE_KINDS and the CPU get no roofline)."""
  kind, _ = parse_topology(topology)
  if kind != "local":
    return CHIPS[kind]
  device_kind = devices[0].device_kind
  if device_kind in DEVICE_KINDS:
    return CHIPS[DEVICE_KINDS[device_kind]]
  return dataclasses.replace(CHIPS["cpu"], name=device_kind)


def target_devices(topology: str) -> list:
  """Compile-only devices for `topology` (TPU via libtpu's topology description; 'cpu:N' = the
  first N local CPU devices; 'h100:N' via the CUDA plugin, docs/scaling.md says how far it goes)."""
  kind, shape = parse_topology(topology)
  if kind in ("local", "cpu"):
    n, have = int(shape), jax.devices() if kind == "local" else jax.devices("cpu")
    if n > len(have):
      hint = (f" (set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts)"
              if kind == "cpu" else "")
      what = "CPU devices" if kind == "cpu" else "devices in this process"
      raise ValueError(f"--topology {topology}: only {len(have)} {what}{hint}")
    return have[:n]
  if kind == "h100":
    return _gpu_devices(int(shape))
  try:
    import libtpu  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ValueError(f"--topology {topology}: TPU topologies need libtpu "
                     "(pip install 'mpma-jax[aot]')") from e
  # Compile-only use: no chips to lock, so several processes (a pod job, tests) may load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    with _quiet_stderr():  # libtpu warns that this host is not a TPU VM: true and expected
      # v4 and v5p chips have two TensorCores, which JAX drives as one device ('megacore').
      chip_config = "megacore" if kind in ("v4", "v5p") else "default"
      desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{kind}:{shape}",
                                          chip_config_name=chip_config)
  except Exception as e:  # libtpu rejects the shape with its own message
    raise ValueError(f"--topology {topology}: libtpu has no such topology "
                     f"({str(e).splitlines()[0]})") from e
  return list(desc.devices)


@contextlib.contextmanager
def _quiet_stderr():
  """Silences file descriptor 2 (C++ logging of libraries) inside the block."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(devnull)
    os.close(saved)


def _gpu_devices(n: int) -> list:
  """Compile-only H100 devices: `n` GPUs per host, one host (n <= 8) or n / 8 hosts of 8.

  Needs jax's CUDA plugin and ptxas (`pip install 'mpma-jax[gpu-aot]'`, ~1 GB) and JAX_PLATFORMS=cpu
  (set before JAX starts; without it the plugin looks for a CUDA driver at import and is not
  registered). XLA:GPU gives no cost analysis for such executables (the estimate then uses the
  analytic FLOPs and no HBM term)."""
  per_host = min(n, 8)
  if n % per_host:
    raise ValueError(f"--topology h100:{n}: more than 8 GPUs must be whole hosts of 8")
  try:
    desc = topologies.get_topology_desc(platform="cuda", topology=f"1x{n // per_host}x{per_host}",
                                        target_config=H100_TARGET_CONFIG)
  except Exception as e:
    first = str(e).splitlines()[0] if str(e) else ""
    raise ValueError(f"--topology h100:{n}: deviceless GPU compilation is not available here "
                     f"({type(e).__name__}: {first}); it needs pip install 'mpma-jax[gpu-aot]' and "
                     "JAX_PLATFORMS=cpu, docs/scaling.md") from e
  return list(desc.devices)


# XLA:GPU's description of the target (a GpuTargetConfigProto): NVIDIA H100 SXM5 80 GB, sm_90,
# 132 SMs, HBM3 at 3.35 TB/s, 50 MB L2, 228 KiB shared memory per SM (227 KiB per block opt-in).
H100_TARGET_CONFIG = """
gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  core_count: 132
  fpus_per_core: 128
  threads_per_block_limit: 1024
  threads_per_warp: 32
  threads_per_core_limit: 2048
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3350000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""


# --- compile --------------------------------------------------------------------------------------
def compiler_options(topology: str) -> dict:
  """XLA options a target needs. Deviceless GPU compiles cannot autotune, and XLA:GPU's Triton GEMM
  emitter then finds no tile sizes for some of the step's small matmuls ("Couldn't find output
  tile sizes", jaxlib 0.10.2): those targets use cuBLAS GEMMs instead."""
  return {"xla_gpu_enable_triton_gemm": False} if parse_topology(topology)[0] == "h100" else {}


@dataclasses.dataclass
class Compiled:
  topology: str
  devices: list
  mesh: dict
  executable: Any
  lower_seconds: float
  compile_seconds: float  # wall time of XLA's compile
  compile_cpu_seconds: float  # CPU time of this process during it (all threads; moves less than
  # the wall time when other work shares the machine)


def compile_step(config: ml_collections.ConfigDict, topology: str, devices=None) -> Compiled:
  """Lowers and compiles `train.make_train_step` for `topology` (config.mesh decides the mesh,
  config.train.batch_size the global batch), with abstract state and batch."""
  devices = target_devices(topology) if devices is None else devices
  mesh = sharding.make_mesh(config.mesh, devices)
  rule_table = sharding.rules(config.mesh)
  model = MPMA.from_config(config)
  tx = optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
    t0 = time.perf_counter()
    abstract, shardings = train.abstract_state(config, model, tx, mesh, rule_table)
    step = train.make_train_step(config, model, tx, shardings, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
        for k, v in pipeline.dummy_batch(config, config.train.batch_size).items()
    }
    lowered = step.lower(abstract, batch)
    t1, c1 = time.perf_counter(), time.process_time()
    executable = lowered.compile(compiler_options=compiler_options(topology))
    t2, c2 = time.perf_counter(), time.process_time()
  return Compiled(topology, list(devices), dict(mesh.shape), executable, t1 - t0, t2 - t1, c2 - c1)


# --- what XLA says --------------------------------------------------------------------------------
def memory(executable) -> dict[str, float]:
  """Per-device bytes from XLA's buffer assignment. 'peak' = arguments + outputs - aliased
  (donated state written in place) + temporaries + generated code: what the step needs resident."""
  m = executable.memory_analysis()
  out = {
      "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
      "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
      "generated_code": m.generated_code_size_in_bytes
  }
  out["peak"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] +
                 out["generated_code"])
  return {k: float(v) for k, v in out.items()}


def cost(executable) -> dict[str, float]:
  """XLA's FLOPs and bytes accessed per device per step (0 where XLA gives none: XLA:GPU).

  XLA counts the body of a while loop once, whatever its trip count: with model.scan (and
  train.grad_accum > 1) these are a fraction of what runs; `estimate` corrects for it."""
  c = executable.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  c = c or {}
  return {
      "flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed", 0.0))
  }


_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
    "s4": 0.5, "u4": 0.5
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*(->.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)="
                      r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO result type: 'bf16[4,16]{1,0}' or a tuple '(f32[2], s32[])' (summed)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(attrs: str, num_devices: int) -> int:
  """Participants per group from replica_groups: {{0,1},{2,3}}, [2,4]<=[8] (iota), or the
  named-mesh form mesh['x'=4, 'y'=2] {'x'}; num_devices when absent."""
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"source_target_pairs=\{(\{.*?\})\}", attrs)
  if m:  # a permute: the length of the ring the first source is on
    step = {int(a): int(b) for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))}
    first = next(iter(step), None)
    device, length = step.get(first), 1
    while device is not None and device != first and length <= len(step):
      device, length = step.get(device), length + 1
    return length if device == first else num_devices
  return num_devices


@dataclasses.dataclass
class Collective:
  kind: str  # one of COLLECTIVE_KINDS
  bytes: float  # per execution per device: gathered output / scattered input / reduced buffer
  group: int  # participating devices
  count: int  # executions per step (loop trip counts applied)


@dataclasses.dataclass
class Hlo:
  """A compiled HLO module's text, split into computations of (opcode, result type, line), with
  how often each computation runs per step and which ones run as instruction sequences (ENTRY,
  loop bodies, branches) rather than as the inside of a fusion or a reducer."""
  computations: dict
  runs: dict
  sequences: set
  sliced: dict = dataclasses.field(default_factory=dict)  # memo of _sliced_reads
  in_place: dict = dataclasses.field(default_factory=dict)  # memo of _in_place_writes


def _find(instructions, name: str) -> Optional[tuple[str, str, str]]:
  for instruction in instructions:
    m = _INSTRUCTION.match(instruction[2])
    if m and m.group(2) == name:
      return instruction
  return None


def _constant(instruction) -> Optional[int]:
  if instruction is None or instruction[0] != "constant":
    return None
  m = re.search(r"constant\((-?\d+)\)", instruction[2])
  return int(m.group(1)) if m else None


def _inferred_trip_count(computations: dict, caller: str, while_line: str) -> int:
  """Trip count of a while loop whose backend config does not give one (XLA:TPU's compiled HLO
  drops known_trip_count): its condition is `counter < N` (or <=, or N > counter) with the
  counter a tuple element that starts at a constant (0 when it is not a constant) and that the
  body adds a constant to (1 when it is not found), as in lax.scan / fori_loop and XLA's
  windowed-einsum loops (which step by 2: one chunk each way round the ring). 1 when the
  condition has another form."""
  cond = re.search(r"condition=%?([\w.\-]+)", while_line)
  instructions = computations.get(cond.group(1), []) if cond else []
  root = next((i for i in instructions if re.match(r"^\s*ROOT\s", i[2])), None)
  if root is None or root[0] != "compare":
    return 1
  direction = re.search(r"direction=(\w+)", root[2])
  lhs, rhs = (_operands(root[2]) + ["", ""])[:2]
  bound, counter = _constant(_find(instructions, rhs)), _find(instructions, lhs)
  flip = {"GT": "LT", "GE": "LE"}
  op = direction.group(1) if direction else ""
  if bound is None:  # N > counter
    bound, counter, op = _constant(_find(instructions, lhs)), _find(instructions, rhs), flip.get(op)
  if bound is None or counter is None or counter[0] != "get-tuple-element" or op not in ("LT",
                                                                                         "LE"):
    return 1
  index = int(re.search(r"index=(\d+)", counter[2]).group(1))
  start = 0
  init = _operands(while_line)
  tuple_op = _find(computations.get(caller, []), init[0]) if init else None
  if tuple_op is not None and tuple_op[0] == "tuple":
    elements = _operands(tuple_op[2])
    if index < len(elements):
      value = _constant(_find(computations[caller], elements[index]))
      start = value if value is not None else 0
  return max(-(-(bound - start + (op == "LE")) // _counter_step(computations, while_line, index)),
             1)


def _counter_step(computations: dict, while_line: str, index: int) -> int:
  """What the loop body adds to tuple element `index` per trip (1 when it is not a constant)."""
  body = re.search(r"body=%?([\w.\-]+)", while_line)
  instructions = computations.get(body.group(1), []) if body else []
  root = next((i for i in instructions if re.match(r"^\s*ROOT\s", i[2])), None)
  if root is None or root[0] != "tuple" or index >= len(_operands(root[2])):
    return 1
  update = _find(instructions, _operands(root[2])[index])
  if update is None or update[0] != "add":
    return 1
  for a, b in (_operands(update[2])[:2], _operands(update[2])[1::-1]):
    read, step = _find(instructions, a), _constant(_find(instructions, b))
    if (read is not None and read[0] == "get-tuple-element" and step and step > 0 and
        int(re.search(r"index=(\d+)", read[2]).group(1)) == index):
      return step
  return 1


def parse_hlo(hlo_text: str) -> Hlo:
  computations: dict[str, list[tuple[str, str, str]]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and not line.lstrip().startswith(("HloModule", "//")):
        current = m.group(2)
        computations[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if m:
      computations[current].append((m.group(4), m.group(3), line))
  if entry is None:
    raise ValueError("HLO text has no ENTRY computation")

  runs: dict[str, int] = {}
  sequences = {entry}

  def visit(name: str, times: int):
    runs[name] = runs.get(name, 0) + times
    for op, _, line in computations.get(name, []):
      if op in ("async-done", "async-update"):
        continue  # the same computation as its async-start
      trip = 1
      if op == "while":
        t = _TRIP_COUNT.search(line)
        trip = int(t.group(1)) if t else _inferred_trip_count(computations, name, line)
      for role, callee in _CALLEES.findall(line):
        if callee in computations:
          if op in ("while", "call", "conditional"):
            sequences.add(callee)
          visit(callee, times * (trip if role == "body" else 1))
      for group in _BRANCHES.findall(line):
        for callee in re.findall(r"%?([\w.\-]+)", group):
          if callee in computations:
            sequences.add(callee)
            visit(callee, times)

  visit(entry, 1)
  return Hlo(computations, runs, sequences)


# Instructions that move no data through HBM themselves (views, control flow, bookkeeping).
_NO_TRAFFIC = {
    "parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "copy-start",
    "copy-done", "add-dependency"
}


def _operands(line: str) -> list[str]:
  args = _INSTRUCTION.match(line).group(5)
  return re.findall(r"%([\w.\-]+)", args[:args.find(")")] if ")" in args else args)


_SLICES = ("dynamic-slice", "slice", "gather")


def _sliced_reads(hlo: Hlo, fused: str) -> dict[int, float]:
  """Fused-computation parameters that are only sliced inside (a scanned layer's weights taken
  from the [layers, ...] stack), directly or by a fusion nested in it: parameter index -> bytes
  actually read (the slices)."""
  if fused in hlo.sliced:
    return hlo.sliced[fused]
  out = hlo.sliced[fused] = {}
  instructions = hlo.computations.get(fused, [])
  for op, _, line in instructions:
    if op != "parameter":
      continue
    name = _INSTRUCTION.match(line).group(2)
    index = int(re.search(r"parameter\((\d+)\)", line).group(1))
    read, only_sliced = 0.0, True
    for u_op, u_shape, u_line in instructions:
      if u_op == "parameter" or name not in _operands(u_line):
        continue
      if u_op in _SLICES and _operands(u_line)[0] == name and _operands(u_line).count(name) == 1:
        read += shape_bytes(u_shape)  # the sliced operand (not a start index)
        continue
      inner = re.search(r"calls=%?([\w.\-]+)", u_line) if u_op == "fusion" else None
      inner_sliced = _sliced_reads(hlo, inner.group(1)) if inner else {}
      positions = [i for i, o in enumerate(_operands(u_line)) if o == name]
      if positions and all(i in inner_sliced for i in positions):
        read += sum(inner_sliced[i] for i in positions)
        continue
      only_sliced = False
      break
    if only_sliced and read:
      out[index] = read
  return out


def _in_place_writes(hlo: Hlo, fused: str) -> tuple[dict[int, float], set[int]]:
  """Outputs of a fused computation that are dynamic-update-slices of one of its parameters
  (a scan writing one layer's activations into the [layers, ...] stack, in place) or that are a
  parameter passed through: ({output index: bytes actually written (the update; 0)}, {parameter
  indices updated in place or passed through, not read})."""
  if fused in hlo.in_place:
    return hlo.in_place[fused]
  instructions = hlo.computations.get(fused, [])
  by_name = {
      _INSTRUCTION.match(line).group(2): (op, shape, line) for op, shape, line in instructions
  }
  root = next((i for i in instructions if re.match(r"^\s*ROOT\s", i[2])), None)
  elements = [root] if root is not None and root[0] != "tuple" else [
      by_name.get(o) for o in (_operands(root[2]) if root is not None else [])
  ]
  written, aliased = {}, set()
  for index, element in enumerate(elements):
    while element is not None and element[0] == "bitcast":
      element = by_name.get(_operands(element[2])[0])
    if element is not None and element[0] == "parameter":  # passed through (XLA:TPU's async
      written[index] = 0.0  # collective fusions hand on the buffers of a collective in flight)
      aliased.add(int(re.search(r"parameter\((\d+)\)", element[2]).group(1)))
      continue
    if element is None or element[0] != "dynamic-update-slice":
      continue
    target, update = (_operands(element[2]) + ["", ""])[:2]
    buffer = by_name.get(target)
    if buffer is None or buffer[0] != "parameter" or update not in by_name:
      continue
    written[index] = shape_bytes(by_name[update][1])
    aliased.add(int(re.search(r"parameter\((\d+)\)", buffer[2]).group(1)))
  hlo.in_place[fused] = (written, aliased)
  return written, aliased


def _result_bytes(shape: str, written: dict[int, float]) -> float:
  """Bytes an instruction writes: its result, with in-place updated outputs as their updates."""
  if not written:
    return shape_bytes(shape)
  parts = _tuple_elements(shape) if shape.startswith("(") else [shape]
  return sum(written.get(i, shape_bytes(part)) for i, part in enumerate(parts))


def _tuple_elements(shape: str) -> list[str]:
  """'(bf16[2,3]{1,0}, (f32[], s32[4]), u8[1])' -> its top-level element types."""
  out, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
      if depth == 0:
        out.append(shape[start:i])
    elif ch == "," and depth == 1:
      out.append(shape[start:i])
      start = i + 1
  return [e.strip() for e in out if e.strip()]


def step_hbm_bytes(hlo: Hlo) -> float:
  """Bytes read and written per step by the instructions that run one after another (a fusion
  reads its operands from and writes its result to memory once; an operand it only slices, just
  the slices; a buffer it updates in place, just the update), loops times their trip counts.
  XLA's own 'bytes accessed' counts a loop body once; this is what the roofline uses."""
  total = 0.0
  for name in hlo.sequences:
    shapes = {}
    for op, shape, line in hlo.computations[name]:
      shapes[_INSTRUCTION.match(line).group(2)] = shape
    for op, shape, line in hlo.computations[name]:
      if op in _NO_TRAFFIC or op.endswith("-start"):
        continue
      operands = _operands(line)
      sliced, written, aliased = {}, {}, set()
      if op == "fusion":
        callee = re.search(r"calls=%?([\w.\-]+)", line)
        if callee:
          sliced = _sliced_reads(hlo, callee.group(1))
          written, aliased = _in_place_writes(hlo, callee.group(1))
      elif op == "dynamic-update-slice" and len(operands) > 1:
        written, aliased = {0: shape_bytes(shapes.get(operands[1], ""))}, {0}
      reads = sum(0.0 if i in aliased else sliced.get(i, shape_bytes(shapes.get(o, "")))
                  for i, o in enumerate(operands))
      total += (_result_bytes(shape, written) + reads) * hlo.runs.get(name, 0)
  return total


_WINDOWED = ("wide.windowed_dot_general_body_ag", "wide.windowed_dot_general_body_rs")


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """Every collective of a compiled HLO module with its executions per step.

  Counts asynchronous pairs once (at '-done', whose result is the output) and a collective that
  several async-collective fusions share (one channel_id) once, treats an all-reduce
  inside a computation named all-reduce-scatter* (XLA:TPU's fused reduce-scatter) as a
  reduce-scatter, the permutes of XLA:TPU's windowed-einsum loops as the all-gather or
  reduce-scatter they carry out, and multiplies ops inside while loops by the loop's trip count
  (its known_trip_count, else read from its condition: `_inferred_trip_count`)."""
  hlo = parse_hlo(hlo_text) if isinstance(hlo_text, str) else hlo_text
  computations, runs = hlo.computations, hlo.runs

  found: dict[tuple[str, float, int], int] = {}
  channels: set[str] = set()
  for name, times in runs.items():
    for op, shape, line in computations[name]:
      base = op[:-5] if op.endswith("-done") else op
      if base not in COLLECTIVE_KINDS or op.endswith("-start"):
        continue
      # XLA:TPU's async collective fusions repeat one collective (same channel) in the fusions
      # that start, advance and finish it: count it once
      channel = re.search(r"channel_id=(\d+)", line)
      if channel and channel.group(1) in channels:
        continue
      if channel:
        channels.add(channel.group(1))
      kind = base
      if base == "all-reduce" and name.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"
      elif base == "collective-permute" and name.startswith(_WINDOWED):
        # XLA:TPU's windowed einsum (collective matmul): an FSDP all-gather or reduce-scatter
        # done as a loop of permutes overlapped with the matmul's chunks
        # (bytes: the chunks it permutes add up to the gathered output / the scattered input)
        kind = "reduce-scatter" if name.startswith(_WINDOWED[1]) else "all-gather"
      nbytes = shape_bytes(shape)
      if op.endswith("-done"):  # attributes (replica groups) are on the matching -start
        group = num_devices
        start = _start_of(computations[name], line)
        if start is not None:
          group = _group_size(start, num_devices)
      else:
        group = _group_size(line, num_devices)
      key = (kind, nbytes, group)
      found[key] = found.get(key, 0) + times
  return [Collective(k, b, g, c) for (k, b, g), c in sorted(found.items())]


def _start_of(instructions, done_line: str) -> Optional[str]:
  """The -start instruction whose result a -done consumes."""
  m = re.search(r"-done\(\s*%?([\w.\-]+)", done_line)
  if not m:
    return None
  for _, _, line in instructions:
    if re.match(rf"^\s*(ROOT\s+)?%?{re.escape(m.group(1))}\s*=", line):
      return line
  return None


def collective_summary(found: list[Collective]) -> dict[str, dict[str, float]]:
  """Per kind: ops per step and bytes per step (per device)."""
  out = {k: {"ops": 0, "bytes": 0.0} for k in COLLECTIVE_KINDS}
  for c in found:
    out[c.kind]["ops"] += c.count
    out[c.kind]["bytes"] += c.bytes * c.count
  return out


# --- roofline -------------------------------------------------------------------------------------
def collective_seconds(c: Collective, chip: Chip) -> float:
  """Ring algorithms over `group` devices at chip.ring_links x link bandwidth (one-way): an
  all-gather or reduce-scatter moves (g-1)/g of the buffer through each device, an all-reduce
  twice that, an all-to-all (g-1)/g, a permute the buffer once."""
  if c.group <= 1:
    return 0.0
  bw = chip.link_gbps * 1e9 * chip.ring_links
  share = {"all-reduce": 2 * (c.group - 1) / c.group,
           "collective-permute": 1.0}.get(c.kind, (c.group - 1) / c.group)
  return c.count * (c.bytes * share / bw + COLLECTIVE_LATENCY_S)


# Executed / model FLOPs of a rematerialisation policy: 'full' recomputes each block's forward
# pass (forward + backward = 1 + 2 -> 1 + 1 + 2); the 'dots' policies keep the matmul outputs.
REMAT_FLOPS = {"none": 1.0, "full": 4.0 / 3.0, "dots": 1.0, "dots_no_batch": 1.0}


def estimate(config, compiled_cost: dict, step_bytes: float, found: list[Collective], chip: Chip,
             num_devices: int) -> dict[str, float]:
  """Roofline step time: max(compute at peak, HBM traffic at bandwidth) + collectives (assumed not
  overlapped: an upper bound; 'overlapped' is the lower bound when they hide completely).

  Compute: the larger of XLA's FLOPs and the analytic count of what runs (model FLOPs x
  REMAT_FLOPS), because XLA's cost analysis counts a loop body once (model.scan, grad_accum) and
  XLA:GPU gives none. HBM: `step_bytes` (step_hbm_bytes of the compiled HLO, loops counted in full).
  MFU and examples/s use the model FLOPs (flops.py), as the training loop reports them."""
  if chip.peak(config.model.dtype) <= 0:
    return {}
  model_flops = flops.train_step_flops(config, config.train.batch_size)
  executed = max(model_flops / num_devices * REMAT_FLOPS[config.model.remat],
                 compiled_cost["flops"])
  peak = chip.peak(config.model.dtype)
  compute = executed / peak
  hbm = step_bytes / (chip.hbm_gbps * 1e9)
  comm = sum(collective_seconds(c, chip) for c in found)
  step = max(compute, hbm) + comm
  return {
      "compute_s": compute, "hbm_s": hbm, "collectives_s": comm, "step_s": step,
      "overlapped_step_s": max(compute, hbm, comm), "mfu": model_flops / num_devices / peak / step,
      "examples_per_s": config.train.batch_size / step,
      "model_flops_per_device": model_flops / num_devices
  }


def report(config, compiled: Compiled, hbm_bytes: float = 0.0, hlo_dir: str = "") -> dict:
  """Everything `mpma-compile` prints for one compiled step, as a JSON-ready dict. hbm_bytes > 0
  replaces the chip's memory in the fit check; hlo_dir: also keep the compiled HLO there
  (gzipped, named after the topology and setting)."""
  chip = chip_for(compiled.topology, compiled.devices)
  if hbm_bytes:
    chip = dataclasses.replace(chip, hbm_bytes=hbm_bytes)
  mem = memory(compiled.executable)
  cst = cost(compiled.executable)
  text = compiled.executable.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    m = compiled.mesh
    name = (f"{config.model.dtype}_{compiled.topology.replace(':', '_')}_mesh{m['data']}x"
            f"{m['fsdp']}x{m['tensor']}_{config.model.remat}_x{config.train.grad_accum}.hlo.gz")
    with gzip.open(os.path.join(hlo_dir, name), "wt") as f:
      f.write(text)
  hlo = parse_hlo(text)
  found = collectives(hlo, len(compiled.devices))
  step_bytes = step_hbm_bytes(hlo)
  out = {
      "topology": compiled.topology,
      "chip": chip.name,
      "devices": len(compiled.devices),
      "mesh": compiled.mesh,
      "dtype": config.model.dtype,
      "remat": config.model.remat,
      "scan": bool(config.model.scan),
      "global_batch": config.train.batch_size,
      "grad_accum": config.train.grad_accum,
      "micro_batch_per_device": config.train.batch_size // config.train.grad_accum //
                                (compiled.mesh["data"] * compiled.mesh["fsdp"]),
      "lower_seconds": compiled.lower_seconds,
      "compile_seconds": compiled.compile_seconds,
      "compile_cpu_seconds": compiled.compile_cpu_seconds,
      "memory": mem,
      "hbm_bytes": chip.hbm_bytes,
      "fits": bool(chip.hbm_bytes == 0 or mem["peak"] <= chip.hbm_bytes),
      "headroom_bytes": chip.hbm_bytes - mem["peak"] if chip.hbm_bytes else None,
      "xla_cost": cst,
      "hbm_bytes_per_step": step_bytes,
      "analytic_flops_per_device": flops.train_step_flops(config, config.train.batch_size) /
                                   len(compiled.devices),
      "collectives": collective_summary(found),
      "estimate": estimate(config, cst, step_bytes, found, chip, len(compiled.devices)),
  }
  return out


# --- printing -------------------------------------------------------------------------------------
def _gib(x: float) -> str:
  return f"{x / GiB:.2f} GiB"


def format_report(r: dict) -> str:
  """The human-readable summary of `report`."""
  m, est = r["memory"], r["estimate"]
  mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"{r['chip']} x {r['devices']} ({r['topology']}), mesh ({mesh}), {r['dtype']}, "
      f"remat={r['remat']}, scan={r['scan']}, global batch {r['global_batch']} "
      f"(grad_accum {r['grad_accum']}, micro-batch {r['micro_batch_per_device']}/device)",
      f"compile: lower {r['lower_seconds']:.1f} s, XLA compile {r['compile_seconds']:.1f} s "
      f"({r['compile_cpu_seconds']:.1f} s CPU)",
      "memory per device (XLA): " +
      ", ".join(f"{k} {_gib(m[k])}"
                for k in ("arguments", "outputs", "aliased", "temporaries", "generated_code")),
  ]
  if r["hbm_bytes"]:
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    lines.append(f"peak {_gib(m['peak'])} of {_gib(r['hbm_bytes'])} HBM: {verdict} "
                 f"(headroom {_gib(r['headroom_bytes'])})")
  else:
    lines.append(f"peak {_gib(m['peak'])} (no HBM limit for this target)")
  c = r["xla_cost"]
  if c["flops"]:
    lines.append(f"per device per step: XLA {c['flops'] / 1e12:.3f} TFLOP (analytic model FLOPs "
                 f"{r['analytic_flops_per_device'] / 1e12:.3f}; XLA counts loop bodies once), "
                 f"{c['bytes_accessed'] / 1e9:.2f} GB accessed (XLA), "
                 f"{r['hbm_bytes_per_step'] / 1e9:.2f} GB (HLO, loops in full)")
  else:
    lines.append(f"per device per step: analytic model FLOPs "
                 f"{r['analytic_flops_per_device'] / 1e12:.3f} TFLOP (no XLA cost analysis), "
                 f"{r['hbm_bytes_per_step'] / 1e9:.2f} GB (HLO, loops in full)")
  lines.append(
      "collectives per step: " + ", ".join(f"{k} {v['ops']} ops {v['bytes'] / 1e6:.1f} MB"
                                           for k, v in r["collectives"].items() if v["ops"]) or
      "none")
  if est:
    lines.append(
        f"estimate: step {est['step_s'] * 1e3:.1f} ms (compute {est['compute_s'] * 1e3:.1f}"
        f", HBM {est['hbm_s'] * 1e3:.1f}, collectives {est['collectives_s'] * 1e3:.1f} ms;"
        f" {est['overlapped_step_s'] * 1e3:.1f} ms if they overlap), "
        f"MFU {100 * est['mfu']:.1f}%, {est['examples_per_s']:,.0f} examples/s")
  return "\n".join(lines)


# --- executables ----------------------------------------------------------------------------------
def save_executable(executable, path: str) -> None:
  """The compiled step, serialized (with its argument trees) for `load_executable`. `executable`
  must come from a real compile, not from the persistent compilation cache: on XLA:CPU such an
  executable serializes without its functions (mpma-compile --save turns the cache off)."""
  payload, in_tree, out_tree = serialize_executable.serialize(executable)
  with open(path, "wb") as f:
    pickle.dump({"payload": payload, "in_tree": in_tree, "out_tree": out_tree}, f)


def load_executable(path: str, backend=None):
  """A step saved by `save_executable`, loaded onto this process's devices (which must be the
  topology it was compiled for): call it as train_step(state, batch)."""
  with open(path, "rb") as f:
    saved = pickle.load(f)
  return serialize_executable.deserialize_and_load(saved["payload"], saved["in_tree"],
                                                   saved["out_tree"], backend=backend)


# --- --suggest ------------------------------------------------------------------------------------
# Memory settings tried per mesh, cheapest in time first: each step trades speed for memory.
MEMORY_LADDER = (("none", 1), ("full", 1), ("full", 2), ("full", 4), ("full", 8))


def mesh_candidates(config, num_devices: int) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) splits of the devices worth trying, most FSDP first (least memory).
  tensor > 1 only where every attention module's heads divide; powers of two only."""
  m = config.model
  heads = (m.image.heads, m.text.heads, m.fusion.heads, m.mim.heads, m.memory.heads)
  out = []
  for tensor in (1, 2, 4):
    if num_devices % tensor or any(h % tensor for h in heads):
      continue
    fsdp = num_devices // tensor
    while fsdp >= 1:
      if (num_devices // tensor) % fsdp == 0:
        out.append((num_devices // tensor // fsdp, fsdp, tensor))
      fsdp //= 2
  return out


def num_params(config) -> int:
  """Parameters of the model (shapes only: nothing is initialised)."""
  model = MPMA.from_config(config)
  shapes = jax.eval_shape(lambda: train.init_params(config, model, jax.random.key(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))


def state_bytes_per_device(params: int, fsdp: int, tensor: int) -> float:
  """Parameters + AdamW moments + gradients (4 x float32 per parameter) split over fsdp x tensor:
  a lower bound on what a device holds, used to skip meshes that cannot fit without compiling."""
  return 16.0 * params / (fsdp * tensor)


def _child_main(conn, fn, args) -> None:
  try:
    conn.send(("ok", fn(*args)))
  except Exception as e:  # pylint: disable=broad-except  (reported to the parent)
    text = str(e).strip().splitlines()
    conn.send(("error", f"{type(e).__name__}: {text[0] if text else ''}"))
  conn.close()


def run_isolated(fn: Callable, *args, timeout: Optional[float] = None):
  """fn(*args) in a fresh child process (spawn; fn importable, args picklable): (result, None), or
  (None, why) when the child raised, died (a compiler abort, a segfault, out of memory) or ran
  past `timeout` seconds. The parent survives whatever the child does."""
  ctx = multiprocessing.get_context("spawn")
  receive, send = ctx.Pipe(duplex=False)
  proc = ctx.Process(target=_child_main, args=(send, fn, args), daemon=True)
  proc.start()
  send.close()  # the child holds the only write end: its death ends the wait below
  try:
    if not receive.poll(timeout):
      proc.kill()
      return None, f"no result after {timeout:.0f} s"
    status, value = receive.recv()
  except EOFError:
    proc.join()
    code = proc.exitcode
    return None, (f"the compiling process was killed by signal {-code}"
                  if code and code < 0 else f"the compiling process exited with {code}")
  finally:
    proc.join(timeout=60)
    receive.close()
  return (value, None) if status == "ok" else (None, value)


def _report_in_child(config_json: str, topology: str, hbm_bytes: float, hlo_dir: str) -> dict:
  """`report` of one compile, run by `suggest` in a child process."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  return report(config, compile_step(config, topology), hbm_bytes, hlo_dir)


def suggest(config, topology: str, devices=None, max_compiles: int = 6, hbm_bytes: float = 0.0,
            max_fits: int = 0, log=None, isolate: Optional[bool] = None, hlo_dir: str = "") -> dict:
  """Compiles settings for `topology` at config.train.batch_size and returns {'tried': [...],
  'fits': [...]} (rows of `report`, plus 'setting'); 'fits' holds only settings whose compiled
  peak memory fits the chip (hbm_bytes overrides the chip's), fastest first by the estimate.
  Stops after max_compiles compiles, or once max_fits (> 0) settings fit. hlo_dir: keep each
  compiled HLO there (`report`).

  isolate (default: when `devices` is not given): each compile runs in its own child process, so
  that a compiler that aborts on one setting ends that setting (recorded with the reason), not the
  search."""
  isolate = devices is None if isolate is None else isolate
  devices = target_devices(topology) if devices is None else devices
  limit = hbm_bytes or chip_for(topology, devices).hbm_bytes
  batch = config.train.batch_size
  tried, compiles = [], 0
  say = log or (lambda line: None)
  params = num_params(config)
  for data, fsdp, tensor in mesh_candidates(config, len(devices)):
    state = state_bytes_per_device(params, fsdp, tensor)
    if limit and state > limit:
      tried.append({
          "setting": _setting(data, fsdp, tensor, "-", 0), "fits": False,
          "skipped": f"state alone {_gib(state)} > {_gib(limit)}"
      })
      continue
    for remat, accum in MEMORY_LADDER:
      if batch % accum or (batch // accum) % (data * fsdp):
        continue
      if compiles >= max_compiles:
        break
      c = config.copy_and_resolve_references()
      c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
      c.model.remat = remat
      c.train.grad_accum = accum
      setting = _setting(data, fsdp, tensor, remat, accum)
      say(f"compiling {setting} ...")
      compiles += 1
      if isolate:
        row, why = run_isolated(_report_in_child, c.to_json_best_effort(), topology, hbm_bytes,
                                hlo_dir)
        if row is None:
          tried.append({"setting": setting, "fits": False, "skipped": f"compile failed: {why}"})
          say(f"  compile failed: {why}")
          if "IndivisibleError" in why:  # a parameter does not split over this mesh: next mesh
            compiles -= 1  # (found while lowering, before XLA compiles anything)
            break
          continue
      else:
        row = report(c, compile_step(c, topology, devices), hbm_bytes, hlo_dir)
      row["setting"] = setting
      tried.append(row)
      say(f"  peak {_gib(row['memory']['peak'])}: {'fits' if row['fits'] else 'does not fit'}"
          f"{'' if not row['estimate'] else ', est. %.1f ms' % (1e3 * row['estimate']['step_s'])}"
          f" (compile {row['compile_seconds']:.0f} s)")
      if row["fits"]:
        break  # more remat or accumulation would only be slower
    if max_fits and sum(1 for r in tried if r.get("fits")) >= max_fits:
      break
  fits = sorted((r for r in tried if r["fits"]), key=lambda r: r["estimate"].get("step_s", 0.0)
                if r["estimate"] else 0.0)
  return {
      "topology": topology, "global_batch": batch, "hbm_bytes": limit, "compiles": compiles,
      "tried": tried, "fits": fits
  }


def _setting(data, fsdp, tensor, remat, accum) -> dict:
  return {
      "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "remat": remat, "grad_accum": accum
  }


def format_suggestions(result: dict) -> str:
  """Settings that fit, fastest first, then what was tried and did not fit."""
  head = (
      "| rank | mesh (data, fsdp, tensor) | remat | grad_accum | micro-batch/device | "
      "peak / HBM | est. step ms | MFU | examples/s |\n|---:|:---|:---|---:|---:|---:|---:|---:|---:|"
  )
  rows = []
  for i, r in enumerate(result["fits"], 1):
    s, est = r["setting"], r["estimate"]
    mesh = (s["mesh"]["data"], s["mesh"]["fsdp"], s["mesh"]["tensor"])
    rows.append(f"| {i} | {mesh} | {s['remat']} | {s['grad_accum']} | "
                f"{r['micro_batch_per_device']} | {_gib(r['memory']['peak'])} / "
                f"{_gib(result['hbm_bytes'])} | {1e3 * est.get('step_s', 0):.1f} | "
                f"{100 * est.get('mfu', 0):.1f}% | {est.get('examples_per_s', 0):,.0f} |")
  out = [
      f"{result['topology']}, global batch {result['global_batch']}: "
      f"{len(result['fits'])} fitting setting(s) from {result['compiles']} compile(s)"
  ]
  out += [head, *rows] if rows else ["nothing fits: raise the device count or lower the batch"]
  misses = [r for r in result["tried"] if not r.get("fits")]
  for r in misses:
    s = r["setting"]
    why = r.get("skipped") or f"peak {_gib(r['memory']['peak'])} > {_gib(result['hbm_bytes'])}"
    out.append(f"  not fitting: mesh {tuple(s['mesh'].values())}, remat {s['remat']}, "
               f"grad_accum {s['grad_accum']}: {why}")
  return "\n".join(out)
