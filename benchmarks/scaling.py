"""Scaling on paper: the base config's pre-training step at 8 -> 256 -> 2048 devices.

  python benchmarks/scaling.py [--config base] [--batches 2,8] [--remat none[,full]]
                               [--no_measure] [--no_hlo] [--mfu 0.45] [--write docs/scaling_model.md]

docs/scaling_model.md was written with `--batches 2,4,8 --write docs/scaling_model.md`.

Prints (or with --write, writes) docs/scaling_model.md: a model of one train step per device, for data
parallelism (DP), FSDP and DP x FSDP hybrids on TPU v5e and on 8xH100 nodes, built from

  measured on this machine (CPU)
    * parameter shapes and logical axis names: jax.eval_shape of train.init_params (no allocation);
    * XLA's temp bytes of the compiled base train step on ONE CPU device at a few batch sizes
      (benchmarks/memory_fit.measure), fitted as temp = a + b * batch: the activation bytes per example;
    * the collectives XLA's SPMD partitioner emits for the step of the base config one layer
      deep on 8 simulated CPU devices;
  analytic
    * FLOPs per step from mpma_jax/flops.py;
    * per-device parameter / AdamW / gradient bytes from the logical names and the rule table;
    * collective bytes per device (ring algorithms, hierarchical over a fast domain and a slow
      network) and an alpha-beta time model with the bandwidths and latencies in HARDWARE.

Runtime on 2 shared cores: each base compile takes 1-2 min (remat=full 2-2.5), the HLO check
~1.5 min: ~4 min by default; --no_measure (the XLA temp bytes recorded in RECORDED) and --no_hlo
skip them. remat=full is taken from RECORDED unless --remat asks for it.
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import collections
import dataclasses
import math
import re
import sys
import textwrap
import time
from typing import Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

from benchmarks import memory_fit as memory
from mpma_jax import flops, masking, optim, sharding, train
from mpma_jax.configs.pretrain import get_config
from mpma_jax.models.mpma import MPMA

GIB, MIB, GB = 2**30, 2**20, 1e9
F32 = 4  # bytes: parameters, gradients, AdamW moments and the GLA embeddings are float32
DEVICES = (8, 256, 2048)
# Global batches considered per device count (256: the paper's); at least one example per device.
BATCHES = {8: (256, 1024), 256: (256, 1024, 4096), 2048: (4096, 16384)}
# XLA temp bytes of the base train step on one CPU device (float32 compute), recorded on this
# machine with measure_temp (jax 0.10.2); used with --no_measure, and for remat=full by default.
RECORDED = {
    "none": {2: 5_207_211_712, 4: 5_987_212_736, 8: 8_406_756_864},
    "full": {2: 5_208_000_576, 4: 6_085_510_976, 8: 8_598_806_720}
}
RECORDED_BF16 = {4: 6_069_521_792}  # model.dtype=bfloat16, remat=none: no saving on CPU


# --- parameters -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Leaf:
  path: str
  shape: tuple
  itemsize: int
  logical: tuple  # logical axis name (or None) per dimension

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def component(self) -> str:
    return self.path.split("/")[0]

  @property
  def group(self) -> str:
    """The layer-level module: one FSDP all-gather / gradient bucket (encoder, fusion and decoder
    blocks; every other top-level module is one group)."""
    parts = self.path.split("/")
    if len(parts) > 2 and re.match(r"(block|layer|text_layer|image_layer)_\d+$", parts[1]):
      return "/".join(parts[:2])
    return parts[0]


def param_leaves(config: ml_collections.ConfigDict) -> list[Leaf]:
  """Every parameter with its shape and logical axes, from jax.eval_shape (nothing allocated)."""
  model = MPMA.from_config(config)
  boxed = jax.eval_shape(lambda: train.init_params(config, model, jax.random.key(0)))
  specs = nn.get_partition_spec(boxed)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  names = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0])
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]:
    spec = tuple(names.get(path, ()))
    out.append(
        Leaf("/".join(str(k.key) for k in path), tuple(x.shape), x.dtype.itemsize,
             spec + (None,) * (len(x.shape) - len(spec))))
  return out


def analytic_param_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Parameters per top-level module, from the config alone (the model code's layer shapes)."""
  m = config.model
  i, t, d = m.image, m.text, m.hidden
  attn = lambda w: 4 * (w * w + w)  # query, key, value [w, H, Dh] + bias, out [H, Dh, w] + bias
  ln = lambda w: 2 * w
  mlp = lambda w, f: w * f + f + f * w + w
  pre_ln = lambda w, f: ln(w) + attn(w) + ln(w) + mlp(w, f)  # ViT / MAE-decoder block
  post_ln = lambda w, f, cross: (attn(w) + ln(w) + (attn(w) + ln(w) if cross else 0) + mlp(w, f) +
                                 ln(w))  # BERT layer (+ cross-attention)
  dense = lambda a, b: a * b + b
  num_patches = (i.size // i.patch)**2
  pixels = i.patch * i.patch * 3
  out = {
      "image_encoder": (pixels * i.width + i.width + (1 + num_patches) * i.width + ln(i.width) +
                        i.layers * pre_ln(i.width, int(i.width * i.mlp_ratio)) + ln(i.width)),
      "text_encoder": ((t.vocab_size + t.max_positions + t.type_vocab_size) * t.width +
                       ln(t.width) + t.layers * post_ln(t.width, t.mlp_dim, False)),
      "image_proj": dense(i.width, d),
      "text_proj": dense(t.width, d),
      "modality_type": 2 * d,
      "fusion": 2 * m.fusion.layers * post_ln(d, m.fusion.mlp_dim, True),
      "text_pooler": dense(d, d),
      "image_pooler": dense(d, d),
      "gla": 2 * dense(d, m.gla.dim) + 2,  # two heads + two log-temperatures
      "mim_decoder": (dense(d, m.mim.width) + m.mim.width +
                      m.mim.depth * pre_ln(m.mim.width, 4 * m.mim.width) + ln(m.mim.width) +
                      dense(m.mim.width, pixels)),
      "mlm_head": dense(d, d) + ln(d) + dense(d, t.vocab_size),
      "itm_head": dense(2 * d, 2),
  }
  if m.memory.enabled:
    out["memory"] = m.memory.slots * d + attn(d)  # slots + query / key / value / out
  return out


def mesh_axes(rules: dict, name: Optional[str]) -> tuple:
  axes = rules.get(name) if name is not None else None
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def shard_bytes(leaf: Leaf, rules: dict, mesh: dict) -> int:
  """Bytes of the leaf one device holds: each dimension split over the mesh axes its logical name
  maps to, rounded up (XLA pads an uneven split: a device holds ceil(dim / parts) rows)."""
  n = leaf.itemsize
  for dim, name in zip(leaf.shape, leaf.logical):
    parts = math.prod(mesh[a] for a in mesh_axes(rules, name))
    n *= -(-dim // parts)
  return n


def split_over(leaf: Leaf, rules: dict, axis: str) -> bool:
  return any(axis in mesh_axes(rules, name) for name in leaf.logical)


def state_per_device(leaves: list[Leaf], rules: dict, data: int, fsdp: int) -> dict:
  """Parameter, AdamW (mu + nu) and gradient bytes per device; gradients are laid out like the
  parameters (after the reduce-scatter)."""
  mesh = {"data": data, "fsdp": fsdp, "tensor": 1}
  params = sum(shard_bytes(x, rules, mesh) for x in leaves)
  return {"params": params, "adamw": 2 * params, "grads": params, "total": 4 * params}


# --- hardware and collectives ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Hardware:
  """One accelerator kind: peak, memory, a fast domain (TPU slice / NVLink node) joined by a slower
  network. Bandwidths are GB/s per device per direction; alpha is the latency of one ring step."""
  name: str
  device_kind: str  # key of flops.PEAK_TFLOPS
  peak_tflops: float  # dense bf16
  hbm_gib: float
  domain: int  # devices on the fast interconnect
  fast: str
  fast_gbs: float
  fast_alpha_us: float
  slow: str
  slow_gbs: float
  slow_alpha_us: float
  torus_side: int = 0  # > 0: the fast domain is a 2-D torus of this side (ring steps per axis)


# Assumptions (see docs/scaling_model.md): v5e ICI 1,600 Gbps per chip (4 links, both directions) =
# 100 GB/s each way; DCN between v5e-256 slices 50 Gbps per chip; H100 SXM NVLink 4 900 GB/s
# bidirectional = 450 GB/s each way; between nodes 8 x 400 Gb/s NICs (one per GPU) = 50 GB/s.
HARDWARE = {
    "v5e": Hardware("TPU v5e", "TPU v5 lite", 197.0, 16.0, 256, "ICI", 100.0, 2.0, "DCN", 6.25,
                    25.0, torus_side=16),
    "h100": Hardware("H100 SXM (8 per node)", "NVIDIA H100 80GB HBM3", 989.0, 80.0, 8, "NVLink 4",
                     450.0, 3.0, "InfiniBand", 50.0, 10.0),
}


@dataclasses.dataclass
class Traffic:
  """Bytes one device sends (= receives) and the modelled time, by link."""
  fast_bytes: float = 0.0
  slow_bytes: float = 0.0
  seconds: float = 0.0

  def __iadd__(self, other):
    self.fast_bytes += other.fast_bytes
    self.slow_bytes += other.slow_bytes
    self.seconds += other.seconds
    return self


def _ring_steps(hw: Hardware, n: int) -> int:
  if n <= 1:
    return 0
  if hw.torus_side and n > hw.torus_side:  # one ring per torus axis
    return (hw.torus_side - 1) + (n // hw.torus_side - 1)
  return n - 1


def collective(hw: Hardware, op: str, size: float, group: int, inner: int,
               efficiency: float) -> Traffic:
  """One all-gather / reduce-scatter / all-reduce of a `size`-byte (full, unsharded) buffer over
  `group` devices, `inner` of them in each fast domain: hierarchical ring algorithm.

    gather or scatter: fast (inner - 1) / inner * size,  slow (M - 1) / M * size / inner,
                       M = group / inner domains;   all-reduce: twice both.
  """
  if op not in ("all-gather", "reduce-scatter", "all-reduce"):
    raise ValueError(f"unknown collective {op!r}")
  if group <= 1:
    return Traffic()
  inner = max(1, min(inner, group))
  if group % inner:
    raise ValueError(f"group of {group} devices does not split into fast domains of {inner}")
  outer = group // inner
  passes = 2 if op == "all-reduce" else 1
  fast = passes * (inner - 1) / inner * size
  slow = passes * (outer - 1) / outer * size / inner
  # Latency: ring steps in the fast domain, a tree (log2 steps) across domains.
  seconds = (
      fast / (hw.fast_gbs * GB * efficiency) + slow / (hw.slow_gbs * GB * efficiency) + passes *
      (_ring_steps(hw, inner) * hw.fast_alpha_us + math.ceil(math.log2(outer)) * hw.slow_alpha_us) *
      1e-6)
  return Traffic(fast, slow, seconds)


def groups(hw: Hardware, data: int, fsdp: int) -> dict[str, tuple[int, int]]:
  """(group size, members per fast domain) of the fsdp, data and batch (data x fsdp) groups: the
  fsdp axis is the inner, contiguous one (jax.make_mesh puts the last mesh axis nearest)."""
  n = data * fsdp
  return {
      "fsdp": (fsdp, min(fsdp, hw.domain)), "data": (data, min(data, max(1, hw.domain // fsdp))),
      "batch": (n, min(n, hw.domain))
  }


def gla_gather_bytes(config: ml_collections.ConfigDict, batch: int) -> int:
  """Full size of the GLA embeddings the contrastive losses need from every device: image
  [B, 1+P, G] and text [B, L, G], float32 (P: all patches with gla.features_from='clean')."""
  m = config.model
  num_patches = (m.image.size // m.image.patch)**2
  keep = masking.num_kept_patches(num_patches, config.masking.image_ratio)
  p = num_patches if m.gla.features_from == "clean" else keep
  return batch * (1 + p + config.data.max_len) * m.gla.dim * F32


def topk_gather_bytes(config: ml_collections.ConfigDict, batch: int) -> int:
  """The memory's top-k scores [B, heads, tokens, slots] (float32) that XLA all-gathers over the
  batch axes as the step is compiled today (lax.top_k is not partitioned; see docs/scaling_model.md)."""
  m = config.model
  if not m.memory.enabled:
    return 0
  num_patches = (m.image.size // m.image.patch)**2
  keep = masking.num_kept_patches(num_patches, config.masking.image_ratio)
  text_reads = m.fusion.layers if m.memory.placement == "every_text_layer" else 1
  tokens = 1 + keep + text_reads * config.data.max_len
  return batch * m.memory.heads * tokens * m.memory.slots * F32


def step_traffic(leaves: list[Leaf], rules: dict, config, hw: Hardware, data: int, fsdp: int,
                 batch: int, regather: bool = False, efficiency: float = 0.8) -> dict:
  """Collectives of one train step per device: 'params' (parameters and gradients), 'gla' (the
  contrastive embeddings) and 'topk' (the memory's scores, as compiled today).

  DP (fsdp = 1): one gradient all-reduce per layer group over data. FSDP: per layer group an
  all-gather of the parameters split over fsdp (again in the backward pass with regather), a
  reduce-scatter of their gradients, then (data > 1) an all-reduce of the gradient shard over
  data; parameters not split over fsdp: an all-reduce over data x fsdp. GLA: an all-gather of
  the image and text embeddings over data x fsdp, and a reduce-scatter of their gradients.
  """
  g = groups(hw, data, fsdp)
  by_group = collections.defaultdict(lambda: [0, 0])  # layer group -> [split, replicated] bytes
  for x in leaves:
    by_group[x.group][0 if fsdp > 1 and split_over(x, rules, "fsdp") else 1] += x.size * x.itemsize
  params = Traffic()
  for split, replicated in by_group.values():
    if split:
      for _ in range(2 if regather else 1):
        params += collective(hw, "all-gather", split, *g["fsdp"], efficiency)
      params += collective(hw, "reduce-scatter", split, *g["fsdp"], efficiency)
      params += collective(hw, "all-reduce", split / fsdp, *g["data"], efficiency)
    if replicated:
      params += collective(hw, "all-reduce", replicated, *g["batch"], efficiency)
  gla = Traffic()
  image_share = 1 - config.data.max_len * config.model.gla.dim * F32 / gla_gather_bytes(config, 1)
  for op in ("all-gather", "reduce-scatter"):
    for share in (image_share, 1 - image_share):  # image and text: one collective each
      gla += collective(hw, op, gla_gather_bytes(config, batch) * share, *g["batch"], efficiency)
  topk = collective(hw, "all-gather", topk_gather_bytes(config, batch), *g["batch"], efficiency)
  return {"params": params, "gla": gla, "topk": topk}


# --- activations (measured) -----------------------------------------------------------------------
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


def linear_fit(points: dict[int, int]) -> tuple[float, float]:
  """Least-squares temp = a + b * batch -> (a, b) in bytes."""
  x = np.array(sorted(points), float)
  y = np.array([points[k] for k in sorted(points)], float)
  b, a = np.polyfit(x, y, 1)
  return float(a), float(b)


def block_input_bytes(config) -> int:
  """Per example: the inputs of every transformer block of the step (float32), which a
  remat='full' step keeps for the backward pass: the part rematerialisation cannot remove."""
  m = config.model
  num_patches = (m.image.size // m.image.patch)**2
  keep = masking.num_kept_patches(num_patches, config.masking.image_ratio)
  length = config.data.max_len
  clean = m.gla.features_from == "clean"
  values = m.image.layers * (1 + keep) * m.image.width
  values += (2 if clean else 1) * m.text.layers * length * m.text.width
  values += m.image.layers * (1 + num_patches) * m.image.width if clean else 0
  values += m.fusion.layers * (length + 1 + keep) * m.hidden
  values += m.mim.depth * (1 + num_patches) * m.mim.width
  return values * F32


# --- HLO check (8 CPU devices) --------------------------------------------------------------------
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(")


def shallow_config(config) -> ml_collections.ConfigDict:
  """The config with every stack one layer deep (widths, tokens, memory and vocab unchanged)."""
  config = ml_collections.ConfigDict(config.to_dict())
  m = config.model
  m.image.layers = m.text.layers = m.fusion.layers = m.mim.depth = m.mim.layer = 1
  return config


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


# --- the model of one step -----------------------------------------------------------------------
@dataclasses.dataclass
class Inputs:
  """What the step model reads: the config, its parameters, the rule table, the activation fit."""
  config: ml_collections.ConfigDict
  leaves: list
  rules: dict
  fit: tuple  # (a, b): XLA temp = a + b * batch on one device, bytes
  mfu: float = 0.45
  efficiency: float = 0.8  # achieved / nominal link bandwidth

  @property
  def param_bytes(self) -> int:
    return sum(x.size * x.itemsize for x in self.leaves)


def meshes_for(n: int, hw: Hardware) -> list[tuple[int, int]]:
  """(data, fsdp) layouts on n devices: DP, FSDP, and hybrids with FSDP over 8 or 16 devices or a
  whole fast domain (node / slice), data parallel across them."""
  out = [(n, 1), (1, n)]
  for fsdp in (8, 16, hw.domain):
    if 1 < fsdp < n and n % fsdp == 0 and (n // fsdp, fsdp) not in out:
      out.append((n // fsdp, fsdp))
  return out


def vit_block(inputs: Inputs) -> dict:
  """Parameter bytes and forward FLOPs per example of one ViT block (masked + clean pass)."""
  config = inputs.config
  m = config.model
  fwd = flops.forward_flops(config, 1)
  patches = (m.image.size // m.image.patch)**2
  patch_embed = 2.0 * patches * m.image.patch**2 * 3 * m.image.width
  f = fwd["image_encoder_masked"] - patch_embed + fwd.get("image_encoder_clean", 0.0)
  size = sum(x.size * x.itemsize for x in inputs.leaves if x.group == "image_encoder/block_0")
  return {"bytes": size, "fwd_flops": f / m.image.layers}


def uneven_split(inputs: Inputs, fsdp: int) -> list[str]:
  """Parameters whose fsdp-split dimension fsdp does not divide (XLA pads: shards of ceil)."""
  out = []
  for x in inputs.leaves:
    for dim, name in zip(x.shape, x.logical):
      if "fsdp" in mesh_axes(inputs.rules, name) and dim % fsdp:
        out.append(x.path)
  return out


def step_row(inputs: Inputs, hw: Hardware, data: int, fsdp: int, batch: int) -> dict:
  """Per device, one (hardware, mesh, global batch): FLOPs, memory, collectives and times."""
  n = data * fsdp
  config = inputs.config
  if batch % n:
    raise ValueError(f"global batch {batch} does not split over {n} devices")
  per_dev = batch // n
  peak = hw.peak_tflops * 1e12 * inputs.mfu
  step_flops = flops.train_step_flops(config, batch) / n
  compute = step_flops / peak
  traffic = step_traffic(inputs.leaves, inputs.rules, config, hw, data, fsdp, batch,
                         efficiency=inputs.efficiency)
  fixed_comm = traffic["params"].seconds + traffic["gla"].seconds
  asis_comm = fixed_comm + traffic["topk"].seconds
  state = state_per_device(inputs.leaves, inputs.rules, data, fsdp)
  a, b = inputs.fit
  # The one-device intercept a (gradients, update temporaries) scales with the shards; FSDP's
  # gathered weights are counted in full (XLA:CPU keeps them all; an upper bound).
  mem = (state["params"] + state["adamw"] + a * state["params"] / inputs.param_bytes +
         (inputs.param_bytes if fsdp > 1 else 0) + b * per_dev)
  mem_asis = mem + topk_gather_bytes(config, batch)
  # Overlap check: one ViT block's collective against its own compute (the forward pass for
  # FSDP's all-gather, the backward pass = 2 x forward for DP's gradient all-reduce).
  block = vit_block(inputs)
  g = groups(hw, data, fsdp)
  if fsdp > 1:
    block_comm = collective(hw, "all-gather", block["bytes"], *g["fsdp"], inputs.efficiency)
    block_compute = block["fwd_flops"] * per_dev / peak
  else:
    block_comm = collective(hw, "all-reduce", block["bytes"], *g["data"], inputs.efficiency)
    block_compute = 2 * block["fwd_flops"] * per_dev / peak
  gb = lambda t: (t.fast_bytes + t.slow_bytes) / GB
  return {
      "hw": hw,
      "n": n,
      "data": data,
      "fsdp": fsdp,
      "batch": batch,
      "per_dev": per_dev,
      "tflop": step_flops / 1e12,
      "compute_ms": compute * 1e3,
      "param_gb": gb(traffic["params"]),
      "slow_gb": traffic["params"].slow_bytes / GB,
      "gla_gb": gb(traffic["gla"]),
      "topk_gb": gb(traffic["topk"]),
      "param_ms": traffic["params"].seconds * 1e3,
      "comm_ms": fixed_comm * 1e3,
      "comm_asis_ms": asis_comm * 1e3,
      "ratio": fixed_comm / compute,
      "ratio_asis": asis_comm / compute,
      "block_ratio": block_comm.seconds / block_compute,
      "mem_gib": mem / GIB,
      "mem_asis_gib": mem_asis / GIB,
      "fits": mem <= hw.hbm_gib * GIB,
      "fits_asis": mem_asis <= hw.hbm_gib * GIB,
      "step_ms": (max(compute, fixed_comm) * 1e3, (compute + fixed_comm) * 1e3),
      "ex_s": batch / max(compute, fixed_comm),
      "uneven": fsdp > 1 and bool(uneven_split(inputs, fsdp)),
  }


def all_rows(inputs: Inputs) -> list[dict]:
  rows = []
  for hw in HARDWARE.values():
    for n in DEVICES:
      for batch in BATCHES[n]:
        for data, fsdp in meshes_for(n, hw):
          rows.append(step_row(inputs, hw, data, fsdp, batch))
  return rows


def recommend(rows: list[dict], hw: Hardware, n: int) -> Optional[dict]:
  """The smallest global batch (closest to the paper's 256) at which some mesh fits in memory
  and its communication (top-k fixed) can hide behind compute (ratio <= 1); at that batch the
  mesh with the least communication. Failing that, the fitting row with the most examples/s."""
  fit = [r for r in rows if r["hw"] is hw and r["n"] == n and r["fits"] and not r["uneven"]]
  hidden = [r for r in fit if r["ratio"] <= 1.0]
  if hidden:
    batch = min(r["batch"] for r in hidden)
    return min((r for r in hidden if r["batch"] == batch), key=lambda r: r["comm_ms"])
  return max(fit, key=lambda r: r["ex_s"]) if fit else None


# --- Markdown -------------------------------------------------------------------------------------
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


def params_section(inputs: Inputs) -> str:
  counts = collections.Counter()
  for x in inputs.leaves:
    counts[x.component] += x.size
  analytic = analytic_param_counts(inputs.config)
  total = sum(counts.values())
  rows = [[
      k, f"{v:,}", f"{analytic.get(k, 0):,}" + ("" if analytic.get(k) == v else " (differs)"),
      f"{v * F32 / MIB:,.1f}", f"{v / total:.1%}"
  ] for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
  rows.append([
      "**total**", f"**{total:,}**", f"{sum(analytic.values()):,}", f"**{total * F32 / MIB:,.1f}**",
      "100%"
  ])
  return _table(["component", "parameters (eval_shape)", "analytic (config)", "MiB fp32", "share"],
                rows)


def state_section(inputs: Inputs) -> str:
  rows = []
  for label, data, fsdp in [("DP (replicated), any N", 1, 1), ("FSDP 8", 1, 8), ("FSDP 16", 1, 16),
                            ("FSDP 128", 1, 128), ("FSDP 256", 1, 256), ("FSDP 2048", 1, 2048)]:
    st = state_per_device(inputs.leaves, inputs.rules, data, fsdp)
    uneven = uneven_split(inputs, fsdp) if fsdp > 1 else []
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


def activations_section(measured: dict, fits: dict, recorded: set) -> str:
  batches = sorted({b for pts in measured.values() for b in pts})
  header = ["per-device batch"] + [
      f"XLA temp GiB, remat={k}" + (" (recorded)" if k in recorded else "") for k in measured
  ]
  rows = [[b] + [f"{measured[k][b] / GIB:.3f}" if b in measured[k] else "-" for k in measured]
          for b in batches]
  rows.append(["fit a (GiB)"] + [f"{fits[k][0] / GIB:.3f}" for k in measured])
  rows.append(["fit b (MiB / example)"] + [f"{fits[k][1] / MIB:.0f}" for k in measured])
  return _table(header, rows)


def flops_section(config) -> str:
  rows = []
  for b in sorted({b for bs in BATCHES.values() for b in bs}):
    fwd = flops.forward_flops(config, b)
    step = flops.train_step_flops(config, b)
    local = fwd.get("gla_local", 0.0) + fwd.get("gla_global", 0.0)
    per_dev = [f"{step / n / 1e12:,.2f}" if b >= n else "-" for n in DEVICES]
    rows.append([
        f"{b:,}", f"{step / 1e15:,.3f}", f"{fwd['total'] / b / 1e9:,.1f}",
        f"{local / fwd['total']:.1%}"
    ] + per_dev)
  return _table(
      ["global batch", "PFLOP / step", "forward GFLOP / example", "GLA contrastive share"] +
      [f"TFLOP / device, N={n}" for n in DEVICES], rows)


def hlo_section(inputs: Inputs, hlo: dict) -> str:
  """Measured collective result bytes (shallow base config, batch 16, 8 CPU devices) against the
  analytic ones."""
  config = shallow_config(inputs.config)
  leaves = param_leaves(config)
  total = sum(x.size * x.itemsize for x in leaves)
  split = sum(x.size * x.itemsize for x in leaves if split_over(x, inputs.rules, "fsdp"))
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
          mib(topk_gather_bytes(config, 16)),
          get(1, "all-gather other"),
          get(8, "all-gather other")
      ],
      [
          "GLA embeddings (gather + scatter) and small tensors",
          mib(2 * gla_gather_bytes(config, 16)), f"{get(1, 'all-reduce other')} (all-reduce)",
          f"{get(8, 'all-reduce other')} (all-reduce) + {get(8, 'all-to-all other')} (all-to-all)"
      ],
  ]
  return _table([
      "collective (result bytes, whole step)", "analytic MiB", "XLA:CPU MiB, DP (8, 1, 1)",
      "XLA:CPU MiB, FSDP (1, 8, 1)"
  ], rows, "lrrr")


def hardware_section(inputs: Inputs) -> str:
  rows = []
  for hw in HARDWARE.values():
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


def step_section(rows: list[dict], hw: Hardware) -> str:
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


def summary_table(rows: list[dict]) -> str:
  out = []
  for hw in HARDWARE.values():
    for n in DEVICES:
      r = recommend(rows, hw, n)
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


def _find(rows, hw, data, fsdp, batch):
  return next(r for r in rows
              if r["hw"] is hw and (r["data"], r["fsdp"], r["batch"]) == (data, fsdp, batch))


def render(inputs: Inputs, measured: dict, recorded: set, hlo: Optional[dict], rows: list[dict],
           command: str) -> str:
  """docs/scaling_model.md."""
  config = inputs.config
  m = config.model
  fits = {k: linear_fit(v) for k, v in measured.items()}
  a, b = inputs.fit
  p_total = sum(x.size for x in inputs.leaves)
  p_bytes = inputs.param_bytes
  v5e, h100 = HARDWARE["v5e"], HARDWARE["h100"]
  fwd256 = flops.forward_flops(config, 256)
  ex_gflop = 3 * fwd256["total"] / 256 / 1e9
  topk_ex = topk_gather_bytes(config, 1)
  gla_ex = gla_gather_bytes(config, 1)
  patches = (m.image.size // m.image.patch)**2
  keep = masking.num_kept_patches(patches, config.masking.image_ratio)
  rec_tpu, rec_gpu = recommend(rows, v5e, 256), recommend(rows, h100, 8)
  length = config.data.max_len
  text_share = (1 + length) / (1 + patches + length)
  n_groups = len({x.group for x in inputs.leaves})
  gdim = m.gla.dim
  none = measured["none"]
  slopes = ", ".join(f"{(none[y] - none[x]) / (y - x) / MIB:,.0f} ({x}->{y})"
                     for x, y in zip(sorted(none),
                                     sorted(none)[1:]))
  dp_tpu = _find(rows, v5e, 256, 1, rec_tpu["batch"])
  paper_tpu = min((r for r in rows if r["hw"] is v5e and r["n"] == 256 and r["batch"] == 256),
                  key=lambda r: r["comm_ms"])
  small = [step_row(inputs, v5e, n // 8, 8, 256) for n in (16, 32)]
  gpu_1024 = _find(rows, h100, rec_gpu["data"], rec_gpu["fsdp"], 1024)
  gpu_fsdp = _find(rows, h100, 1, 8, rec_gpu["batch"])
  hours = [config.train.steps * t / 3.6e6 for t in rec_gpu["step_ms"]]
  per_ex_ms = lambda hw: 3 * fwd256["total"] / 256 / (hw.peak_tflops * 1e12 * inputs.mfu) * 1e3
  hide = lambda r: r["param_ms"] / per_ex_ms(r["hw"])  # examples per device to hide it
  local_share = lambda batch: (lambda f: f.get("gla_local", 0.0) / f["total"])(flops.forward_flops(
      config, batch))
  rec_b = rec_tpu["batch"]
  steps_equal = config.train.steps * config.train.batch_size // rec_b
  first_no_fit = min(
      (r["batch"]
       for r in rows if r["hw"] is v5e and r["n"] == 256 and r["fits"] and not r["fits_asis"]),
      default=None)
  measured_names = ", ".join(
      f"remat={k}" + (" (recorded)" if k in recorded else "") for k in measured)
  hlo_text = ""
  if hlo is not None:
    dp_reduce = hlo[1].get("all-reduce param", 0) / _shallow_bytes(inputs)
    other_reduce = (hlo[1].get("all-reduce other", 0) /
                    (2 * gla_gather_bytes(shallow_config(config), 16)))
    hlo_text = f"""
### Checked against XLA: collectives of the compiled step (measured, CPU)

The base config (`model.dtype=bfloat16`) with every stack one layer deep (same widths, tokens,
memory, vocabulary), global batch 16, compiled on 8 simulated CPU devices; bytes are the result
sizes of the collectives in the partitioned HLO (what one device's program moves, before the ring
factor).

{hlo_section(inputs, hlo)}

What this shows:
* **FSDP gathers each parameter about once per step** (all-gathered bytes =
  {hlo[8].get('all-gather param', 0) / _shallow_split(inputs):.2f} x the split parameter bytes,
  in fp32 although the compute is bf16): the backward pass reuses the forward's gathered weights
  (remat = none), so the tables count one all-gather per layer group.
* **The memory's top-k is not partitioned**: `lax.top_k` on the batch-sharded score tensor
  `[B, heads, tokens, slots]` makes XLA all-gather the whole tensor and compute top-k on the
  global batch on every device. Measured on its own (a `[16, 2, 24, 32]` input split 8 ways):
  `lax.top_k` emits the all-gather; `jnp.sort(x)[..., -k]`, `lax.approx_max_k` and `top_k`
  inside `jax.shard_map` emit no collective. The memory only needs the k-th largest score
  (impl = masked) or per-row indices (impl = gather), so either replacement is local. At base
  size this is {topk_ex / MIB:.1f} MiB per example ({m.memory.heads} heads x ({1 + keep} image +
  {config.data.max_len} text tokens) x {m.memory.slots} slots x 4 B): see the "as is" columns.
* **Gradients of the encoders are reduced twice on CPU**: the encoders run twice (masked and
  clean passes) and XLA:CPU all-reduces the two partial gradients separately (DP: measured
  all-reduce = {dp_reduce:.2f} x the parameter bytes).
  GPU/TPU pipelines normally re-associate `all-reduce(a) + all-reduce(b)` into one; if not, DP
  and FSDP gradient traffic is up to (P + P_encoders) / P = {_encoder_factor(inputs):.2f} x the
  tables' figure. XLA:CPU also keeps FSDP's gradient reduction as an all-reduce (2x the bytes of
  the reduce-scatter GPU/TPU emit).
* **The GLA loss** moves the other devices' embeddings; on CPU XLA all-reduces image chunks
  inside FILIP's `lax.map` instead of one all-gather. All non-parameter reductions together
  (these, the losses, norms) are {other_reduce:.1f}x (DP) the modelled GLA bytes at this
  batch: read the GLA columns as a lower bound within that factor.
"""
  recommendation = f"""
### TPU v5e-256: {_mesh_title(rec_tpu)}, global batch {rec_b:,} ({rec_tpu['per_dev']} per chip)

* **Communication decides the batch.** Every layout moves about {rec_tpu['param_gb']:.1f} GB per
  chip per step for parameters and gradients (two ring passes over the fp32 parameters; DP,
  FSDP and hybrids alike), ~{rec_tpu['param_ms']:.0f} ms on ICI at the assumed bandwidth (the
  GLA embeddings add {rec_tpu['comm_ms'] - rec_tpu['param_ms']:.0f} ms at this batch, about
  {text_share:.0%} of that if only the text embeddings travelled), while a
  chip computes one example in {per_ex_ms(v5e):.1f} ms (at MFU {inputs.mfu:g}). Hiding the
  parameter traffic alone needs about {hide(rec_tpu):.0f} examples per chip: at the paper's
  batch of 256 (1 per chip) comm / compute is {paper_tpu['ratio']:.1f}
  ({paper_tpu['ex_s']:,.0f} examples/s); at {rec_b:,} it is {rec_tpu['ratio']:.2f}
  ({rec_tpu['ex_s']:,.0f} examples/s), the smallest batch in the tables whose communication can
  hide behind compute, if only just: reducing gradients and gathering weights in bf16 (half the
  parameter bytes) would give it a margin.
* **Memory.** {rec_tpu['mem_gib']:.1f} GiB per chip (an upper bound, see caveats) of 16 GiB; pure
  DP at this batch needs {dp_tpu['mem_gib']:.1f} GiB ({_fits(dp_tpu)}).
  FSDP over all 256 chips is not needed and splits the MIM decoder's {m.mim.width}-wide tensors
  unevenly (padded shards); fsdp = {rec_tpu['fsdp']} keeps every gather inside a small group of
  chips and the rest is data parallel.
* **Prerequisite: the top-k fix.** As compiled today the memory's top-k gathers
  {rec_tpu['topk_gb']:.0f} GB per chip per step at this batch and the step needs
  {rec_tpu['mem_asis_gib']:.0f} GiB per chip: it does not fit
  {f'from a global batch of {first_no_fit:,}' if first_no_fit else ''}. Replace `lax.top_k` in
  `mpma_jax/models/memory.py` by a local k-th-value computation (above) first.
* **Batch vs the paper.** {rec_b:,} is {rec_b // config.train.batch_size}x the paper's 256. The
  contrastive losses then see {rec_b // config.train.batch_size}x more negatives (usually helpful
  for CLIP-style losses, but it changes the task: re-check retrieval, not only the loss), and
  FILIP's local similarity grows as B^2: {local_share(rec_b):.0%} of the step's FLOPs at
  {rec_b:,} against {local_share(256):.0%} at 256. Keep the number of epochs
  (`train.steps` {config.train.steps:,} -> {steps_equal:,}) and the 10 % warm-up. The learning
  rate was tuned at 256: AdamW does not follow the linear scaling rule; start from square-root
  scaling (x{math.sqrt(rec_b / 256):.0f}: `optim.lr` {config.optim.lr:g} ->
  {config.optim.lr * math.sqrt(rec_b / 256):g}) and sweep x0.5 / x1 / x2 with `mpma-sweep`
  before the full run.
* **Paper-faithful alternative.** To keep batch 256, use a smaller slice: v5e-16 (data=2,
  fsdp=8: 16 per chip, comm / compute {small[0]['ratio']:.2f}, {small[0]['mem_gib']:.1f} GiB) or
  v5e-32 (data=4, fsdp=8: 8 per chip, comm / compute {small[1]['ratio']:.2f},
  {small[1]['mem_gib']:.1f} GiB).

### 8xH100: {_mesh_title(rec_gpu)}, global batch {rec_gpu['batch']:,} ({rec_gpu['per_dev']} per GPU)

* **Compute-bound already.** comm / compute {rec_gpu['ratio']:.2f} ({rec_gpu['comm_ms']:.1f} ms
  of NVLink traffic against {rec_gpu['compute_ms']:.1f} ms of compute per step), and DP's
  gradient all-reduce overlaps the backward pass (ViT-block ratio
  {rec_gpu['block_ratio']:.2f}). {config.train.steps:,} steps take {hours[0]:.1f}-{hours[1]:.1f} h
  (overlapped-serial) at MFU {inputs.mfu:g}.
* **Memory.** {rec_gpu['mem_gib']:.1f} GiB per GPU of 80 (upper bound). FSDP (1, 8, 1) would
  save parameter and optimizer memory ({gpu_fsdp['mem_gib']:.1f} GiB) for slightly more
  communication ({gpu_fsdp['comm_ms']:.1f} ms): use it if memory gets tight (a larger model,
  `remat=none` at a larger batch).
* **No reason to leave the paper's batch**: at 1,024 the step is {gpu_1024['compute_ms'] /
  rec_gpu['compute_ms']:.1f}x longer for {gpu_1024['ex_s'] / rec_gpu['ex_s']:.2f}x the
  examples/s and {gpu_1024['mem_gib']:.0f} GiB per GPU ({_fits(gpu_1024)};
  as is with the top-k gather: {gpu_1024['mem_asis_gib']:.0f} GiB). Keep the paper's learning rate
  and schedule. The top-k gather costs {rec_gpu['topk_gb']:.1f} GB per GPU per step at 256 (comm /
  compute as is {rec_gpu['ratio_asis']:.2f}): worth fixing, not blocking.

### Tensor parallelism: tensor = 1 everywhere

The model has {p_total / 1e6:.0f} M parameters: sharding them over fsdp already makes the state
small, so tensor parallelism buys no memory that is needed. It would split the 768-wide matmuls
(lower MFU per device) and add two activation all-reduces per transformer block in the forward
pass and two in the backward pass ({_tp_bytes(config) / MIB:.0f} MiB per example per step at
tensor = 2, bf16), and one train step on a mesh with all three axes > 1 is still a known gap
(README, "Known gaps").

### 2048 devices

Not worth it for this model: even at a global batch of 16,384 (8 per device, 64x the paper's)
the best layouts stay communication-bound (summary table), the GLA embeddings alone are
{_find(rows, h100, 256, 8, 16384)['gla_gb']:.0f} GB per device per step, and FILIP's B^2 term is
{local_share(16384):.0%} of the FLOPs. If it must be done: FSDP inside the fast domain and data
parallel across (H100: (256, 8, 1), FSDP within each NVLink node; v5e: 8 slices of 256,
(data, fsdp) = (128, 16) with the data axis crossing DCN), the top-k fixed, bf16 gradient
reduction, and the GLA loss restructured so that only text embeddings ({config.data.max_len}
tokens instead of {1 + patches}) travel.
"""
  doc = f"""# Scaling on paper: MPMA base pre-training from 8 to 2,048 devices

Issue "Performance", part 4. Generated by `{command}` (jax {jax.__version__}); regenerate rather
than edit. The model of one pre-training step of `configs/pretrain.py:base` (ViT-B/16 at
{m.image.size} px, RoBERTa-base, {m.fusion.layers} + {m.fusion.layers} fusion layers, memory of
{m.memory.slots} slots, GLA dim {m.gla.dim}, text length {config.data.max_len}) per device, for
data parallelism (DP), FSDP and DP x FSDP hybrids on TPU v5e and on 8xH100 nodes.

**Measured on this machine (CPU)**: parameter shapes and logical axes (`jax.eval_shape` of
`train.init_params`, nothing allocated); XLA's temp memory of the compiled base train step on one
CPU device at a few batch sizes ({measured_names}); the collectives in the compiled SPMD step on
8 simulated CPU devices. **Analytic**: everything at 8 / 256 / 2,048 devices: FLOPs
(`mpma_jax/flops.py`), state bytes per device (logical axes x `config.mesh.rules`), collective
bytes (formulas below) and times from the bandwidth, latency and MFU **assumptions** in
"Hardware". Nothing here ran on a TPU or a GPU.

## Summary

* **{p_total:,} parameters** ({p_bytes / MIB:,.0f} MiB fp32). Parameters + AdamW (2x) + gradients
  = 4 x that = {4 * p_bytes / GIB:.1f} GiB per device under DP; FSDP over N divides it by N (up to
  padding where N does not divide 768 or {m.mim.width}).
* **{ex_gflop:,.0f} GFLOP per example** per train step (3 x forward, batch 256); the contrastive
  GLA terms are quadratic in the global batch ({local_share(256):.1%} of the FLOPs at 256,
  {local_share(4096):.0%} at 4,096).
* **Activations**: {b / MIB:,.0f} MiB per example on CPU (fp32, XLA:CPU temp; an upper bound).
* **Communication** per device per step is about 2 x the fp32 parameter bytes
  (~{2 * p_bytes / GB:.1f} GB) whatever the layout (DP, FSDP, hybrid: ring algorithms), plus the
  GLA embeddings ({gla_ex / 1024:.0f} KiB per example, gathered and scattered back), which grow
  with the global batch. Hiding the parameter traffic needs enough compute per device:
  roughly {hide(rec_tpu):.0f} examples per v5e chip (ICI) and
  {hide(_find(rows, h100, 8, 1, 256)):.0f} per H100 (NVLink), many more across nodes.
* **As compiled today the memory's `lax.top_k` all-gathers its scores over the batch**:
  {topk_ex / MIB:.1f} MiB per example, {topk_gather_bytes(config, 256) / GB:.1f} GB per device
  at batch 256, {topk_gather_bytes(config, 4096) / GB:.0f} GB at 4,096, which neither fits in
  v5e memory nor hides behind compute. A local replacement (sort-based k-th value or shard_map)
  removes it; tables give both ("fixed" / "as is").
* **Recommendations**: TPU v5e-256: (data, fsdp, tensor) = ({rec_tpu['data']}, {rec_tpu['fsdp']},
  1), global batch {rec_b:,}, after the top-k fix, with the learning-rate caveat below. 8xH100:
  ({rec_gpu['data']}, {rec_gpu['fsdp']}, 1) at the paper's batch {rec_gpu['batch']}.

Best layout per hardware and device count (top-k fixed; the rule: the smallest global batch whose
communication can hide behind compute and whose memory fits, else the most examples/s):

{summary_table(rows)}

## 1. Parameters and state

Exact counts from `jax.eval_shape`, and the same from the config alone
(`scaling.analytic_param_counts`: the layer shapes of the model code):

{params_section(inputs)}

Bytes per device: each tensor's dimension named `embed` is split over `fsdp` (the rule table),
padded to ceil(dim / fsdp) when fsdp does not divide it; the biases of `mlp` / `heads` outputs
and the two temperatures stay replicated. AdamW keeps two fp32 moments, gradients are laid out
like the parameters (after the reduce-scatter). DP replicates everything:

{state_section(inputs)}

`benchmarks/memory_fit.py` reads the same parameter and optimizer bytes off the compiled shardings
on 8 CPU devices (tests/test_scaling_model.py checks the two agree on a small config). FSDP 2,048
is not an option: 768 / 2,048 rounds up to one row per device, so each device holds 1/768 of a
tensor instead of 1/2,048, and {m.mim.width}-wide tensors already split unevenly beyond 128.

## 2. Activations (measured on CPU)

XLA's temp bytes of the compiled base train step (`benchmarks/memory_fit.measure`, one CPU device,
float32 compute, no mesh), fitted as temp = a + b x batch:

{activations_section(measured, fits, recorded)}

* b is the activation memory per example; a is what does not grow with the batch (the gradients,
  {p_bytes / GIB:.2f} GiB, and the optimizer update's temporaries) and is scaled with the
  parameter shards in the memory estimates.
* **This is an upper bound.** XLA:CPU keeps activations for the backward pass in full (no fused
  attention) and does not schedule for peak memory; the temp is also not exactly linear
  (the slope between consecutive batches: {slopes} MiB per example).
* remat = full does not lower the CPU temp (table): XLA:CPU's buffer assignment does not profit
  from rematerialisation. What remat = full must keep is the input of every transformer
  block: {block_input_bytes(config) / MIB:.0f} MiB per example (fp32, analytic), plus the
  non-rematerialised heads, memory scores and losses; on an accelerator expect a large cut.
* bfloat16 on CPU does not show the accelerator saving either: XLA:CPU computes bf16 through
  float32 converts (temp at batch 4: {RECORDED_BF16[4] / GIB:.2f} GiB with bf16 against
  {RECORDED['none'][4] / GIB:.2f} GiB with fp32, recorded).
  The memory columns below use the fp32 fit as is.

## 3. FLOPs per step (analytic, `mpma_jax/flops.py`)

{flops_section(config)}

Per device = train_step_flops(B) / N: the batch is split over data x fsdp; the GLA similarity
matrices are computed for the local rows against all columns, so their B^2 terms divide by N too.

## 4. Collectives per step

Per device, ring algorithms (bytes each device sends; it receives as many). P = fp32 parameter
bytes ({p_bytes / GB:.2f} GB), S = bytes of the tensors split over fsdp, R = P - S (replicated),
N = data x fsdp devices, B = global batch.

```
DP (data = N):             all-reduce of gradients              2 (N-1)/N * P
FSDP (fsdp = F):           all-gather of parameters (forward)    (F-1)/F * S    (x2 if gathered
                                                                                 again in backward)
                           reduce-scatter of gradients          (F-1)/F * S
hybrid (data = D):         + all-reduce of gradient shards      2 (D-1)/D * S/F
replicated tensors:        all-reduce over D x F                2 (N-1)/N * R
GLA contrastive losses:    all-gather + reduce-scatter          2 (N-1)/N * B (1 + P_img + L) G * 4
                           (image [B, 1+{patches}, {gdim}], text [B, {length}, {gdim}], fp32)
memory top-k (as is):      all-gather of the scores             (N-1)/N * B heads (1+n+L) slots * 4
```

A group that spans several fast domains (inner members per domain, M domains) runs
hierarchically: per pass (inner-1)/inner * X bytes on the fast links and (M-1)/M * X / inner on
the slow ones (each device carries 1/inner of the inter-domain traffic). Time per collective =
fast bytes / (fast bandwidth x {inputs.efficiency:g}) + slow bytes / (slow bandwidth x
{inputs.efficiency:g}) + latency (alpha x ring steps in the fast domain, alpha x log2 M steps
across domains); one collective per layer group and direction ({n_groups} groups:
the transformer blocks and the other top-level modules). Compute = train_step_flops / N /
(peak x MFU {inputs.mfu:g}); the step takes between max(compute, comm) (fully overlapped) and
compute + comm (serial). The "ViT-block comm / compute" column compares one ViT block's
collective (FSDP: its all-gather against its forward pass; DP: its gradient all-reduce against
its backward pass) with that block's compute: below 1 the collective can be prefetched / issued
behind the layer's compute, above 1 the step waits on the network.

Memory estimate per device = parameters + AdamW (shards) + a x (parameter shard / P) + (FSDP
only) all parameters gathered at once (fp32; XLA:CPU keeps them for the whole step, an accelerator
holds a few layers: an upper bound) + b x per-device batch; "as is" adds the gathered top-k
scores.
{hlo_text}
## 5. Hardware (assumptions)

{hardware_section(inputs)}

* TPU v5e: 197 bf16 TFLOP/s and 16 GiB HBM per chip (Google's published figures); ICI assumed
  1,600 Gbps per chip over 4 links, both directions = 100 GB/s each way, with collectives on the
  16 x 16 slice using all links (a group laid along one axis gets half); v5e slices end at
  256 chips, so 2,048 chips are 8 slices joined by the data-center network, assumed 50 Gbps per
  chip.
* H100 SXM: 989 dense bf16 TFLOP/s (flops.PEAK_TFLOPS has 989.4: the same figure), 80 GiB
  (about 78 usable); NVLink 4 900 GB/s per GPU bidirectional = 450 GB/s each way inside a node
  of 8; between nodes 8 x 400 Gb/s NICs (InfiniBand / RoCE, one per GPU) = 50 GB/s per GPU each
  way; 2,048 GPUs = 256 nodes.
* Links are assumed to reach {inputs.efficiency:.0%} of nominal; latencies are order-of-magnitude
  guesses; MFU {inputs.mfu:g} on both (the training loop logs the real MFU, README "Throughput").

## 6. Step model per device

Columns: memory (top-k fixed / as is, GiB, upper bound); bytes each device sends per step for
parameters + gradients (of which over the slow network), GLA embeddings and the top-k gather;
communication time and comm / compute with the top-k fixed / as is. ⚠uneven: some tensors are
split unevenly (padded shards).

### TPU v5e

{step_section(rows, v5e)}

### H100 SXM (8 per node)

{step_section(rows, h100)}

## 7. Recommendations
{recommendation}
## 8. Caveats

* Every time here is a model: assumed bandwidths at {inputs.efficiency:.0%} efficiency,
  assumed latencies and MFU; measure on the hardware (the training loop logs step time and MFU)
  before committing to a pod size.
* Memory figures are upper bounds: CPU temp (activations kept in full, no memory-aware
  scheduling, fp32), and FSDP's gathered weights counted in full.
* Gradients and FSDP's gathers are fp32 because the parameters are; reducing gradients and
  gathering weights in bf16 would halve the parameter traffic.
* Optimizer update (elementwise, over 1/N of the state under FSDP), data loading and host input
  are not modelled.
* The GLA traffic is modelled as gathering image and text embeddings; gathering text only (and
  mapping FILIP over the local images) would cut it to {text_share:.0%}.
"""
  return doc


def reflow(text: str, width: int = 100) -> str:
  """Re-wraps the Markdown's paragraphs and bullets (numbers make template lines ragged); tables,
  headings and code blocks are left as they are."""
  out, words, prefix, in_code = [], [], "", False

  def flush():
    if words:
      out.append(
          textwrap.fill(" ".join(words), width, initial_indent=prefix,
                        subsequent_indent=" " * len(prefix), break_long_words=False,
                        break_on_hyphens=False))
    words.clear()

  for line in text.splitlines():
    if line.startswith("```"):
      flush()
      in_code = not in_code
      out.append(line)
    elif in_code or not line.strip() or line.startswith(("|", "#")):
      flush()
      out.append(line)
    elif line.startswith("* "):
      flush()
      prefix = "* "
      words.extend(line[2:].split())
    else:
      if not words:
        prefix = ""
      words.extend(line.split())
  flush()
  return "\n".join(out) + "\n"


def _mesh_title(r: dict) -> str:
  return f"mesh (data={r['data']}, fsdp={r['fsdp']}, tensor=1)"


def _fits(r: dict) -> str:
  return "fits" if r["fits"] else "does not fit"


def _shallow_split(inputs: Inputs) -> int:
  return sum(x.size * x.itemsize for x in param_leaves(shallow_config(inputs.config))
             if split_over(x, inputs.rules, "fsdp"))


def _shallow_bytes(inputs: Inputs) -> int:
  return sum(x.size * x.itemsize for x in param_leaves(shallow_config(inputs.config)))


def _encoder_factor(inputs: Inputs) -> float:
  """(P + P_encoders) / P: gradient bytes if the two passes' encoder gradients are reduced apart."""
  encoders = sum(x.size * x.itemsize for x in inputs.leaves
                 if x.component in ("image_encoder", "text_encoder"))
  return (inputs.param_bytes + encoders) / inputs.param_bytes


def _tp_bytes(config, tensor: int = 2) -> float:
  """Per example and step: tensor parallelism's activation all-reduces (bf16), two per block in
  the forward pass (attention, MLP; fusion layers three with cross-attention) and as many in the
  backward pass, ring factor 2 (T-1)/T."""
  m = config.model
  patches = (m.image.size // m.image.patch)**2
  keep = masking.num_kept_patches(patches, config.masking.image_ratio)
  length = config.data.max_len
  values = 2 * m.image.layers * (1 + keep + 1 + patches) * m.image.width  # masked + clean passes
  values += 2 * 2 * m.text.layers * length * m.text.width
  values += 3 * m.fusion.layers * (length + 1 + keep) * m.hidden
  values += 2 * m.mim.depth * (1 + patches) * m.mim.width
  return 2 * values * 2 * 2 * (tensor - 1) / tensor  # forward + backward, bf16, ring


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="base", help="variant of configs/pretrain.py")
  parser.add_argument("--batches", default="2,8",
                      help="per-device batch sizes to compile on one CPU device for the fit")
  parser.add_argument("--remat", default="none", help="comma-separated model.remat policies")
  parser.add_argument("--no_measure", action="store_true",
                      help="no base compile: use the XLA temp bytes recorded in RECORDED")
  parser.add_argument("--no_hlo", action="store_true", help="skip the 8-device HLO check")
  parser.add_argument("--mfu", type=float, default=0.45, help="assumed model FLOPs utilisation")
  parser.add_argument("--efficiency", type=float, default=0.8,
                      help="achieved fraction of nominal link bandwidth")
  parser.add_argument("--write", default="", help="write the Markdown here instead of printing")
  args = parser.parse_args()

  t0 = time.perf_counter()
  config = get_config(args.config)
  config.model.dtype = "bfloat16"  # the compute dtype the recommendations assume
  leaves = param_leaves(config)
  rules = dict(sharding.rules(config.mesh))
  measured, recorded = {}, set()
  for remat in args.remat.split(","):
    if args.no_measure:
      measured[remat], _ = RECORDED[remat], recorded.add(remat)
    else:
      fp32 = ml_collections.ConfigDict(config.to_dict())
      fp32.model.dtype = "float32"  # XLA:CPU shows no bf16 saving (see the doc)
      measured[remat] = measure_temp(fp32, [int(b) for b in args.batches.split(",")], remat)
  if "full" not in measured:
    measured["full"], _ = RECORDED["full"], recorded.add("full")
  inputs = Inputs(config, leaves, rules, linear_fit(measured["none"]), args.mfu, args.efficiency)
  hlo = None
  if not args.no_hlo and len(jax.devices()) >= 8:
    hlo = {f: hlo_collectives(shallow_config(config), f) for f in (1, 8)}
  rows = all_rows(inputs)
  command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:])
  doc = reflow(render(inputs, measured, recorded, hlo, rows, command.strip()))
  if args.write:
    os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
    with open(args.write, "w") as f:
      f.write(doc)
    print(f"wrote {args.write}", file=sys.stderr)
  else:
    print(doc)
  print(f"total wall time {time.perf_counter() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
  main()
