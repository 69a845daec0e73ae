"""The analytic scaling model: one pre-training step per device at 8, 256 and 2,048 devices.

Pure functions of a config (no compile, no command line, no Markdown): parameter shapes and
logical axes (jax.eval_shape, nothing allocated), per-device state bytes for DP, FSDP and
DP x FSDP hybrids, collective bytes per device (ring algorithms, hierarchical over a fast domain
and a slow network), an alpha-beta time model with the assumptions in HARDWARE, and the memory
estimate from a linear fit of XLA's temp bytes (measured by benchmarks/scaling.py).

benchmarks/scaling.py turns the results into the tables of docs/scaling_model.md; the formulas
are described there (section 4).
"""
import collections
import dataclasses
import math
import re
from typing import Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mpma_jax import flops, masking, train
from mpma_jax.models.mpma import MPMA

GIB, MIB, GB = 2**30, 2**20, 1e9
F32 = 4  # bytes: parameters, gradients, AdamW moments and the GLA embeddings are float32
DEVICES = (8, 256, 2048)
# Global batches considered per device count (256: the paper's); at least one example per device.
BATCHES = {8: (256, 1024), 256: (256, 1024, 4096), 2048: (4096, 16384)}
# XLA temp bytes of the base train step on one CPU device (float32 compute), recorded on this
# machine with scaling.measure_temp (jax 0.10.2); used with --no_measure, and for remat=full by
# default.
RECORDED = {
    "none": {2: 5_207_211_712, 4: 5_987_212_736, 8: 8_406_756_864},
    "full": {2: 5_208_000_576, 4: 6_085_510_976, 8: 8_598_806_720}
}
RECORDED_BF16 = {4: 6_069_521_792}  # model.dtype=bfloat16, remat=none: no saving on CPU


# --- parameters -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Leaf:
  """One parameter: its path, shape, bytes per element and logical axis name per dimension."""
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
  """The mesh axes a logical axis name maps to under the rule table (() if none)."""
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
  """Whether some dimension of the leaf is split over the mesh axis."""
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


# Assumptions (docs/scaling_model.md, "Hardware"): v5e ICI 1,600 Gbps per chip (4 links, both
# directions) = 100 GB/s each way; DCN between v5e-256 slices 50 Gbps per chip; H100 SXM NVLink 4
# 900 GB/s bidirectional = 450 GB/s each way; between nodes 8 x 400 Gb/s NICs (one per GPU) =
# 50 GB/s.
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


def _patches(config) -> tuple[int, int]:
  """(all patches, patches kept by the image mask)."""
  m = config.model
  num_patches = (m.image.size // m.image.patch)**2
  return num_patches, masking.num_kept_patches(num_patches, config.masking.image_ratio)


def gla_gather_bytes(config: ml_collections.ConfigDict, batch: int) -> int:
  """Full size of the GLA embeddings the contrastive losses need from every device: image
  [B, 1+P, G] and text [B, L, G], float32 (P: all patches with gla.features_from='clean')."""
  m = config.model
  num_patches, keep = _patches(config)
  p = num_patches if m.gla.features_from == "clean" else keep
  return batch * (1 + p + config.data.max_len) * m.gla.dim * F32


def topk_gather_bytes(config: ml_collections.ConfigDict, batch: int) -> int:
  """The memory's top-k scores [B, heads, tokens, slots] (float32) that XLA all-gathers over the
  batch axes when the read uses lax.top_k (memory.impl = gather; docs/scaling_model.md)."""
  m = config.model
  if not m.memory.enabled:
    return 0
  _, keep = _patches(config)
  text_reads = m.fusion.layers if m.memory.placement == "every_text_layer" else 1
  tokens = 1 + keep + text_reads * config.data.max_len
  return batch * m.memory.heads * tokens * m.memory.slots * F32


def step_traffic(leaves: list[Leaf], rules: dict, config, hw: Hardware, data: int, fsdp: int,
                 batch: int, regather: bool = False, efficiency: float = 0.8) -> dict:
  """Collectives of one train step per device: 'params' (parameters and gradients), 'gla' (the
  contrastive embeddings) and 'topk' (the memory's scores, when gathered).

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


# --- activations ----------------------------------------------------------------------------------
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
  num_patches, keep = _patches(config)
  length = config.data.max_len
  clean = m.gla.features_from == "clean"
  values = m.image.layers * (1 + keep) * m.image.width
  values += (2 if clean else 1) * m.text.layers * length * m.text.width
  values += m.image.layers * (1 + num_patches) * m.image.width if clean else 0
  values += m.fusion.layers * (length + 1 + keep) * m.hidden
  values += m.mim.depth * (1 + num_patches) * m.mim.width
  return values * F32


def tp_allreduce_bytes(config, tensor: int = 2) -> float:
  """Per example and step: tensor parallelism's activation all-reduces (bf16), two per block in
  the forward pass (attention, MLP; fusion layers three with cross-attention) and as many in the
  backward pass, ring factor 2 (T-1)/T."""
  m = config.model
  patches, keep = _patches(config)
  length = config.data.max_len
  values = 2 * m.image.layers * (1 + keep + 1 + patches) * m.image.width  # masked + clean passes
  values += 2 * 2 * m.text.layers * length * m.text.width
  values += 3 * m.fusion.layers * (length + 1 + keep) * m.hidden
  values += 2 * m.mim.depth * (1 + patches) * m.mim.width
  return 2 * values * 2 * 2 * (tensor - 1) / tensor  # forward + backward, bf16, ring


def shallow_config(config) -> ml_collections.ConfigDict:
  """The config with every stack one layer deep (widths, tokens, memory and vocab unchanged)."""
  config = ml_collections.ConfigDict(config.to_dict())
  m = config.model
  m.image.layers = m.text.layers = m.fusion.layers = m.mim.depth = m.mim.layer = 1
  return config


# --- the model of one step ------------------------------------------------------------------------
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
  """step_row for every hardware, device count, global batch and mesh of the tables."""
  rows = []
  for hw in HARDWARE.values():
    for n in DEVICES:
      for batch in BATCHES[n]:
        for data, fsdp in meshes_for(n, hw):
          rows.append(step_row(inputs, hw, data, fsdp, batch))
  return rows


def find_row(rows: list[dict], hw: Hardware, data: int, fsdp: int, batch: int) -> dict:
  """The row of one hardware, mesh and global batch."""
  return next(r for r in rows
              if r["hw"] is hw and (r["data"], r["fsdp"], r["batch"]) == (data, fsdp, batch))


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


# --- the figures the text of docs/scaling_model.md quotes -----------------------------------------
def figures(inputs: Inputs, rows: list[dict], measured: dict,
            hlo: Optional[dict] = None) -> dict[str, float]:
  """Derived numbers that docs/scaling_model.md quotes in its text, keyed by section and meaning
  (scaling.py --figures prints them, for whoever edits the text).

  Args:
    inputs: the step model's inputs (the base config in the document).
    rows: all_rows(inputs).
    measured: XLA temp bytes per remat policy and per-device batch.
    hlo: collective result bytes of the shallow step on 8 CPU devices, keyed by fsdp (1 and 8),
      or None when not measured.

  Returns:
    An ordered mapping of a short description to its value.
  """
  config = inputs.config
  v5e, h100 = HARDWARE["v5e"], HARDWARE["h100"]
  p_bytes = inputs.param_bytes
  fwd256 = flops.forward_flops(config, 256)
  patches, _ = _patches(config)
  rec_tpu, rec_gpu = recommend(rows, v5e, 256), recommend(rows, h100, 8)
  rec_b = rec_tpu["batch"]
  per_ex_ms = lambda hw: 3 * fwd256["total"] / 256 / (hw.peak_tflops * 1e12 * inputs.mfu) * 1e3
  hide = lambda r: r["param_ms"] / per_ex_ms(r["hw"])  # examples per device to hide it
  local = lambda b: (lambda f: f.get("gla_local", 0.0) / f["total"])(flops.forward_flops(config, b))
  paper_tpu = min((r for r in rows if r["hw"] is v5e and r["n"] == 256 and r["batch"] == 256),
                  key=lambda r: r["comm_ms"])
  dp_tpu = find_row(rows, v5e, 256, 1, rec_b)
  small = [step_row(inputs, v5e, n // 8, 8, 256) for n in (16, 32)]
  gpu_1024 = find_row(rows, h100, rec_gpu["data"], rec_gpu["fsdp"], 1024)
  gpu_fsdp = find_row(rows, h100, 1, 8, rec_gpu["batch"])
  no_fit = [
      r["batch"] for r in rows
      if r["hw"] is v5e and r["n"] == 256 and r["fits"] and not r["fits_asis"]
  ]
  none = measured["none"]
  out = {
      "summary: parameters": sum(x.size for x in inputs.leaves),
      "summary: parameter MiB (fp32)": p_bytes / MIB,
      "summary: params + AdamW + grads GiB per device (DP)": 4 * p_bytes / GIB,
      "summary: GFLOP per example per step (batch 256)": 3 * fwd256["total"] / 256 / 1e9,
      "summary: GLA local share of FLOPs at 256": local(256),
      "summary: GLA local share of FLOPs at 4,096": local(4096),
      "summary: activation MiB per example (fit b)": inputs.fit[1] / MIB,
      "summary: parameter traffic GB per device (2 P)": 2 * p_bytes / GB,
      "summary: GLA KiB per example": gla_gather_bytes(config, 1) / 1024,
      "summary: examples per v5e chip to hide the parameter traffic": hide(rec_tpu),
      "summary: examples per H100 to hide the parameter traffic": hide(
          find_row(rows, h100, 8, 1, 256)),
      "summary: top-k MiB per example (gather)": topk_gather_bytes(config, 1) / MIB,
      "summary: top-k GB per device at 256": topk_gather_bytes(config, 256) / GB,
      "summary: top-k GB per device at 4,096": topk_gather_bytes(config, 4096) / GB,
      "2: gradient GiB": p_bytes / GIB,
      "2: block inputs MiB per example (remat=full)": block_input_bytes(config) / MIB,
      "2: bf16 temp GiB at batch 4 (recorded)": RECORDED_BF16[4] / GIB,
      "2: fp32 temp GiB at batch 4 (recorded)": RECORDED["none"][4] / GIB,
  }
  for x, y in zip(sorted(none), sorted(none)[1:]):
    out[f"2: temp slope MiB per example {x}->{y}"] = (none[y] - none[x]) / (y - x) / MIB
  out["4: P GB"] = p_bytes / GB
  out["4: layer groups"] = len({x.group for x in inputs.leaves})
  if hlo is not None:
    shallow = param_leaves(shallow_config(config))
    total = sum(x.size * x.itemsize for x in shallow)
    split = sum(x.size * x.itemsize for x in shallow if split_over(x, inputs.rules, "fsdp"))
    encoders = sum(x.size * x.itemsize for x in inputs.leaves
                   if x.component in ("image_encoder", "text_encoder"))
    out.update({
        "4 (XLA): FSDP all-gathered / split parameter bytes": hlo[8].get("all-gather param", 0) /
                                                              split,
        "4 (XLA): DP all-reduce / parameter bytes": hlo[1].get("all-reduce param", 0) / total,
        "4 (XLA): (P + P_encoders) / P": (p_bytes + encoders) / p_bytes,
        "4 (XLA): other all-reduces / modelled GLA bytes (DP)": hlo[1].get(
            "all-reduce other", 0) / (2 * gla_gather_bytes(shallow_config(config), 16)),
    })
  out.update({
      "7 v5e: parameter GB per chip": rec_tpu["param_gb"],
      "7 v5e: parameter ms": rec_tpu["param_ms"],
      "7 v5e: GLA ms": rec_tpu["comm_ms"] - rec_tpu["param_ms"],
      "7 v5e: text share of the GLA bytes":
          (1 + config.data.max_len) / (1 + patches + config.data.max_len),
      "7 v5e: ms per example per chip": per_ex_ms(v5e),
      "7 v5e: comm / compute at batch 256": paper_tpu["ratio"],
      "7 v5e: examples/s at batch 256": paper_tpu["ex_s"],
      "7 v5e: recommended global batch": rec_b,
      "7 v5e: recommended comm / compute": rec_tpu["ratio"],
      "7 v5e: recommended examples/s": rec_tpu["ex_s"],
      "7 v5e: recommended GiB per chip": rec_tpu["mem_gib"],
      "7 v5e: DP GiB per chip at that batch": dp_tpu["mem_gib"],
      "7 v5e: top-k GB per chip (gather)": rec_tpu["topk_gb"],
      "7 v5e: GiB per chip as is (gather)": rec_tpu["mem_asis_gib"],
      "7 v5e: smallest batch that does not fit as is": min(no_fit, default=0),
      "7 v5e: GLA local share of FLOPs at that batch": local(rec_b),
      "7 v5e: train.steps for the same epochs": config.train.steps * config.train.batch_size //
                                                rec_b,
      "7 v5e: learning rate x sqrt(batch / 256)": config.optim.lr * math.sqrt(rec_b / 256),
      "7 v5e-16 (2, 8): comm / compute at 256": small[0]["ratio"],
      "7 v5e-16 (2, 8): GiB per chip": small[0]["mem_gib"],
      "7 v5e-32 (4, 8): comm / compute at 256": small[1]["ratio"],
      "7 v5e-32 (4, 8): GiB per chip": small[1]["mem_gib"],
      "7 H100: comm / compute": rec_gpu["ratio"],
      "7 H100: comm ms": rec_gpu["comm_ms"],
      "7 H100: compute ms": rec_gpu["compute_ms"],
      "7 H100: ViT-block comm / compute": rec_gpu["block_ratio"],
      "7 H100: hours for train.steps (overlapped)": config.train.steps * rec_gpu["step_ms"][0] /
                                                    3.6e6,
      "7 H100: hours for train.steps (serial)": config.train.steps * rec_gpu["step_ms"][1] / 3.6e6,
      "7 H100: GiB per GPU": rec_gpu["mem_gib"],
      "7 H100: FSDP (1, 8, 1) GiB per GPU": gpu_fsdp["mem_gib"],
      "7 H100: FSDP (1, 8, 1) comm ms": gpu_fsdp["comm_ms"],
      "7 H100: step at 1,024 / step at 256": gpu_1024["compute_ms"] / rec_gpu["compute_ms"],
      "7 H100: examples/s at 1,024 / at 256": gpu_1024["ex_s"] / rec_gpu["ex_s"],
      "7 H100: GiB per GPU at 1,024": gpu_1024["mem_gib"],
      "7 H100: GiB per GPU at 1,024 as is (gather)": gpu_1024["mem_asis_gib"],
      "7 H100: top-k GB per GPU (gather)": rec_gpu["topk_gb"],
      "7 H100: comm / compute as is (gather)": rec_gpu["ratio_asis"],
      "7 tensor: parameters (M)": sum(x.size for x in inputs.leaves) / 1e6,
      "7 tensor: all-reduce MiB per example at tensor = 2": tp_allreduce_bytes(config) / MIB,
      "7 2048: GLA GB per device, H100 (256, 8, 1) at 16,384": find_row(rows, h100, 256, 8, 16384)
                                                               ["gla_gb"],
      "7 2048: GLA local share of FLOPs at 16,384": local(16384),
      "7 2048: text tokens": config.data.max_len,
      "7 2048: image tokens": 1 + patches,
  })
  return out
