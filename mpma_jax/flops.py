"""Analytic FLOP count of MPMA pre-training, device peaks, and TFLOP/s and MFU from a step time.

Pure arithmetic on the config (no tracing), cheap enough to call from the training loop.

What is counted
---------------
* A matmul [M, K] x [K, N] is 2*M*K*N FLOPs; the patch-embedding convolution is counted as the
  matmul it is. Attention counts its four projections and both the score (Q K^T) and value (P V)
  matmuls.
* Elementwise work is ignored: LayerNorm, activations, softmax, bias and residual adds, embedding
  look-ups (gathers), top-k selection, L2 normalisation, FILIP's max / mean reductions, the losses'
  log-softmax and MSE. tests/test_flops.py checks that the count equals the dot and convolution
  FLOPs of the compiled forward pass exactly, and is 93-97% of XLA's cost analysis at widths
  128-256 (XLA also counts the elementwise ops; their share shrinks as the width grows).
* `forward_flops` = one `MPMA.__call__` (with ITM exactly when config.loss.itm > 0, as the train
  step calls it) + the contractions of the losses in `losses.compute_losses` whose weight is
  non-zero. It counts what the compiled step computes:
    - the patch embedding once, though both image passes embed the same image (XLA's
      common-subexpression elimination merges them); likewise the memory slots' key and value
      projections once per forward pass, however many reads;
    - not the image stream's last fusion layer in the pre-training pass: only the image pooler
      reads it, and that pass pools nothing, so it is dead code (unless mim.layer == fusion.layers);
    - a head whose loss weight is 0 (MLM, MIM, GLA) still is counted, as MPMA.__call__ computes
      it (XLA may then drop it: the count is an upper bound for such configs).
* `train_step_flops` = 3 x forward: each matmul's backward is two matmuls of its size (gradients
  of both operands). Rematerialisation (model.remat) and the optimizer update are not counted:
  model FLOPs, the MFU convention, so that recomputation does not raise MFU. With
  train.grad_accum = a it is a x 3 x forward(batch / a).

Formulas (B = batch size)
-------------------------
  dense(t, a, c)  = 2 B t a c                                     t tokens, a -> c features
  attn(t, s, w)   = 4 B t w^2 + 4 B s w^2 + 4 B t s w             t queries over s keys, width w
                    (Q and output projections, K and V projections, scores and values)
  mlp(t, w, f)    = 4 B t w f
  block(t, w, f)  = attn(t, t, w) + mlp(t, w, f)

  N = (image.size / patch)^2, n = num_kept_patches(N, masking.image_ratio), L = data.max_len,
  Dv, Dt, d = image / text / fusion (hidden) widths, G = gla.dim, S = memory.slots,
  k = memory.topk, K = fusion.layers, f = fusion.mlp_dim, V = text.vocab_size, W = mim.width,
  P = patches the GLA sees: N with gla.features_from = 'clean' (or masking.paired = False), n with
  'masked'; ITM always sees all N.

  image_encoder_masked = dense(N, p*p*3, Dv) + image.layers * block(1 + n, Dv, mlp_ratio * Dv)
  image_encoder_clean  = image.layers * block(1 + N, Dv, mlp_ratio * Dv)    ('clean' or ITM)
  text_encoder_masked  = text.layers * block(L, Dt, text.mlp_dim)
  text_encoder_clean   = text_encoder_masked                                ('clean' or ITM)
  projections_masked   = dense(1 + n, Dv, d) + dense(L, Dt, d)
  projections_clean    = dense(1 + N, Dv, d) + dense(L, Dt, d)              ('clean' or ITM)
  gla_heads            = dense(1 + P, d, G) + dense(L, d, G)
  memory               = 4 S d^2 + read(1 + n) + R * read(L)     (0 with memory.enabled False)
                         4 S d^2: the slots' keys and values, R = 1 ('pre_fusion') or K
                         ('every_text_layer'), read(t) = 2 dense(t, d, d) (query, output)
                         + 2 B t S d (scores against all S slots)
                         + 2 B t S d (impl 'masked': dense over S) | 2 B t k d (impl 'gather')
  fusion               = K * text_layer + (K - 1) * image_layer  (K image layers if mim.layer == K)
                         text_layer  = attn(L, L, d) + attn(L, 1 + n, d) + mlp(L, d, f)
                         image_layer = attn(1 + n, 1 + n, d) + attn(1 + n, L, d) + mlp(1 + n, d, f)
  mim_decoder          = dense(1 + n, d, W) + mim.depth * block(1 + N, W, 4 W) + dense(N, W, p*p*3)
  mlm_head             = dense(L, d, d) + dense(L, d, V)
  gla_global           = 2 B^2 G                      [B, G] x [G, B]            (loss.global_ > 0)
  gla_local            = 2 B^2 P L G  ('filip': a patch x word cosine matrix per image-text pair)
                       | 4 B^2 P L G  ('attention': the cosines, then the attended contexts)
                                                                                  (loss.local > 0)
  itm                  = the memory reads (not the slot projections) and all K layers of both
                         streams of a second fusion pass with 1 + N image tokens (unmasked),
                         + two poolers 2 dense(1, d, d) + the head dense(1, 2d, 2)   (loss.itm > 0)
  with masking.paired = False, memory and fusion also count M3AE's MLM pass: the unmasked image
  (1 + N tokens, its last image layer unused) with the masked text.
  total                = the sum of the above

The contrastive terms are quadratic in the batch, over the *global* batch (negatives from every
device): call `forward_flops` with the global batch size, and divide by the number of devices for a
per-device figure.
"""
from typing import Optional

from mpma_jax import masking

# Dense peak TFLOP/s per JAX device (jax.Device.device_kind), from the vendors' published figures
# (NVIDIA's "with sparsity" numbers halved). 'float32' is what a float32 matmul gets at JAX's
# default precision: TPUs then run one bfloat16 pass (same peak as bfloat16), NVIDIA Ampere and
# later use TF32 tensor cores. TPU v2 and v3 expose each TensorCore as a device (half a chip); from
# v4 on a device is a whole chip.
_TPU = lambda tflops: {"bfloat16": tflops, "float32": tflops}
PEAK_TFLOPS = {
    "TPU v2": _TPU(22.5),  # 45 per chip, 2 cores
    "TPU v3": _TPU(61.5),  # 123 per chip, 2 cores
    "TPU v4": _TPU(275.0),
    "TPU v5 lite": _TPU(197.0),  # v5e
    "TPU v5e": _TPU(197.0),
    "TPU v5": _TPU(459.0),  # v5p (JAX reports 'TPU v5')
    "TPU v5p": _TPU(459.0),
    "TPU v6 lite": _TPU(918.0),  # v6e, Trillium
    "TPU v6e": _TPU(918.0),
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4, "float32": 494.7},  # SXM5
    "NVIDIA H100 PCIe": {"bfloat16": 756.5, "float32": 378.0},
    "NVIDIA H100 NVL": {"bfloat16": 835.5, "float32": 417.5},
    "NVIDIA H200": {"bfloat16": 989.4, "float32": 494.7},  # SXM
    "NVIDIA H200 NVL": {"bfloat16": 835.5, "float32": 417.5},
    "NVIDIA GH200 480GB": {"bfloat16": 989.4, "float32": 494.7},
    "NVIDIA B200": {"bfloat16": 2250.0, "float32": 1100.0},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA A100-PCIE-40GB": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA A100 80GB PCIe": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA L4": {"bfloat16": 121.0, "float32": 60.0},
}


# --- building blocks (FLOPs for b sequences of t tokens) ----------------------------------------
def _dense(b, t, d_in, d_out):
  return 2.0 * b * t * d_in * d_out


def _attention(b, t, s, d):
  """t queries attending over s keys, width d (all heads together)."""
  return (_dense(b, t, d, d) * 2  # query, output projections
          + _dense(b, s, d, d) * 2  # key, value projections
          + 2.0 * b * t * s * d * 2)  # scores Q K^T and values P V


def _mlp(b, t, d, f):
  return _dense(b, t, d, f) + _dense(b, t, f, d)


def _block(b, t, d, f):
  return _attention(b, t, t, d) + _mlp(b, t, d, f)


def _memory_read(b, t, m, d):
  """One MA-CMF read by B x t tokens: query / output projections, scores over all S slots and the
  top-k read. The slots' key / value projections are counted once per forward pass, not here."""
  read = 2.0 * b * t * m.slots * d if m.impl == "masked" else 2.0 * b * t * m.topk * d
  return _dense(b, t, d, d) * 2 + 2.0 * b * t * m.slots * d + read


def _memory(b, image_tokens, length, config):
  """All memory reads of one fusion pass (image pre-fusion; text by placement)."""
  m, d = config.model.memory, config.model.hidden
  if not m.enabled:
    return 0.0
  text_reads = config.model.fusion.layers if m.placement == "every_text_layer" else 1
  return _memory_read(b, image_tokens, m, d) + text_reads * _memory_read(b, length, m, d)


def _fusion(b, image_tokens, length, config, last_image_layer: bool):
  """K co-attention layers, text stream over L tokens and image stream over image_tokens.

  The image stream's last layer feeds only the image pooler, so without it (last_image_layer
  False) K text layers and K - 1 image layers are counted.
  """
  f, d = config.model.fusion, config.model.hidden
  text = (_attention(b, length, length, d) + _attention(b, length, image_tokens, d) +
          _mlp(b, length, d, f.mlp_dim))
  image = (_attention(b, image_tokens, image_tokens, d) + _attention(b, image_tokens, length, d) +
           _mlp(b, image_tokens, d, f.mlp_dim))
  return f.layers * text + (f.layers - (0 if last_image_layer else 1)) * image


# --- public ---------------------------------------------------------------------------------------
def forward_flops(config, batch_size: int) -> dict[str, float]:
  """FLOPs of one pre-training forward pass (MPMA.__call__ + compute_losses) on `batch_size`
  examples (the global batch), per component and under 'total'. See the module docstring."""
  m = config.model
  b = batch_size
  i, t = m.image, m.text
  d = m.hidden
  num_patches = (i.size // i.patch)**2
  n_keep = masking.num_kept_patches(num_patches, config.masking.image_ratio)
  length = config.data.max_len
  pixels = i.patch * i.patch * 3
  if m.gla.features_from not in ("clean", "masked"):
    raise ValueError(f"gla.features_from must be 'clean' or 'masked', got {m.gla.features_from!r}")
  paired = config.masking.get("paired", True)  # False: M3AE's two fused passes
  clean = m.gla.features_from == "clean" or not paired  # GLA on the unmasked features
  gla_patches = num_patches if clean else n_keep  # P: patches the GLA sees
  # ITM always fuses the unmasked image and text, so it needs the clean encoder passes too
  needs_clean = clean or config.loss.itm > 0

  # The patch embedding runs on all N patches (the MAE gather comes after it), and both passes
  # embed the same image: XLA computes it once (common-subexpression elimination).
  patch_embed = _dense(b, num_patches, pixels, i.width)
  vit = lambda tokens: i.layers * _block(b, tokens, i.width, int(i.width * i.mlp_ratio))
  text_encoder = t.layers * _block(b, length, t.width, t.mlp_dim)
  out = {
      "image_encoder_masked": patch_embed + vit(1 + n_keep),
      "text_encoder_masked": text_encoder,
      "projections_masked": _dense(b, 1 + n_keep, i.width, d) + _dense(b, length, t.width, d),
  }
  if needs_clean:
    out["image_encoder_clean"] = vit(1 + num_patches)
    out["text_encoder_clean"] = text_encoder
    out["projections_clean"] = (_dense(b, 1 + num_patches, i.width, d) +
                                _dense(b, length, t.width, d))
  out["gla_heads"] = _dense(b, 1 + gla_patches, d, m.gla.dim) + _dense(b, length, d, m.gla.dim)
  # The pre-training pass pools nothing, so its last image layer is dead code (XLA drops it)
  # unless the MIM decoder reads it.
  out["memory"] = _memory(b, 1 + n_keep, length, config)
  out["fusion"] = _fusion(b, 1 + n_keep, length, config,
                          last_image_layer=m.mim.layer == m.fusion.layers)
  if not paired:  # + the MLM pass: the unmasked image with the masked text (its image side unused)
    out["memory"] += _memory(b, 1 + num_patches, length, config)
    out["fusion"] += _fusion(b, 1 + num_patches, length, config, last_image_layer=False)
  if m.memory.enabled:  # the slots' key and value projections: the same for every read (CSE)
    out["memory"] += 2 * _dense(1, m.memory.slots, d, d)
  # MIMDecoder's MLP is 4x its width (its mlp_ratio default; not a config field).
  out["mim_decoder"] = (_dense(b, 1 + n_keep, d, m.mim.width) +
                        m.mim.depth * _block(b, 1 + num_patches, m.mim.width, 4 * m.mim.width) +
                        _dense(b, num_patches, m.mim.width, pixels))
  out["mlm_head"] = _dense(b, length, d, d) + _dense(b, length, d, t.vocab_size)

  if config.loss.global_:
    out["gla_global"] = 2.0 * b * b * m.gla.dim  # [B, G] x [G, B]
  if config.loss.local:
    if m.gla.local not in ("filip", "attention"):
      raise ValueError(f"model.gla.local must be 'filip' or 'attention', got {m.gla.local!r}")
    pair = 2.0 * gla_patches * length * m.gla.dim  # one [P, G] x [G, L] cosine matrix
    out["gla_local"] = b * b * pair * (1 if m.gla.local == "filip" else 2)
  if config.loss.itm > 0:
    itm_tokens = 1 + num_patches  # ITM fuses the unmasked features
    out["itm"] = (_memory(b, itm_tokens, length, config) +
                  _fusion(b, itm_tokens, length, config, last_image_layer=True) +
                  2 * _dense(b, 1, d, d) + _dense(b, 1, 2 * d, 2))  # poolers, head
  out["total"] = sum(out.values())
  return out


def train_step_flops(config, batch_size: int) -> float:
  """Model FLOPs of one training step on a global batch of `batch_size`: forward + backward =
  3 x forward (no rematerialisation, no optimizer update). With train.grad_accum = a > 1 the step
  runs a forward passes on micro-batches of batch_size / a, whose contrastive terms are quadratic
  in the micro-batch only."""
  accum = config.get("train", {}).get("grad_accum", 1)
  if accum < 1 or batch_size % accum:
    raise ValueError(f"train.grad_accum={accum} must be >= 1 and divide batch_size={batch_size}")
  return 3.0 * accum * forward_flops(config, batch_size // accum)["total"]


def peak_flops(device, dtype: str, override_tflops: float = 0.0) -> Optional[float]:
  """Peak FLOP/s of one device for matmuls in `dtype` ('bfloat16' | 'float32').

  device: a jax.Device or its device_kind string. A positive override_tflops wins; a device
  missing from PEAK_TFLOPS (the CPU, say) gives None, and MFU is then not reported.
  """
  if dtype not in ("bfloat16", "float32"):
    raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = getattr(device, "device_kind", device)
  peaks = PEAK_TFLOPS.get(kind)
  return None if peaks is None else peaks[dtype] * 1e12


def throughput(step_flops: float, step_seconds: float, num_devices: int,
               peak_flops_per_device: Optional[float]) -> dict[str, float]:
  """Achieved TFLOP/s per device and, when the peak is known, MFU (achieved / peak, in [0, 1])."""
  if step_seconds <= 0 or num_devices < 1:
    raise ValueError(f"need step_seconds > 0 and num_devices >= 1, got {step_seconds}, "
                     f"{num_devices}")
  per_device = step_flops / step_seconds / num_devices  # FLOP/s
  out = {"tflops_per_device": per_device / 1e12}
  if peak_flops_per_device:
    out["mfu"] = per_device / peak_flops_per_device
  return out
