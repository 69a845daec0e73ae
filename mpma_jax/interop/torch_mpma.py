"""The whole MPMA model as a PyTorch nn.Module, numerically equal to the JAX `MPMA` (float32).

Submodule names follow the JAX parameter tree, so that every state-dict entry maps to one JAX
parameter ('/' <-> '.'), with these layout changes:

  Dense kernel [in, out]                 <-> nn.Linear weight [out, in]
  HeadsIn kernel [D, H, Dh], bias [H, Dh] <-> nn.Linear weight [H*Dh, D], bias [H*Dh]
  HeadsOut kernel [H, Dh, D]             <-> nn.Linear weight [D, H*Dh]
  Conv kernel [p, p, 3, D]               <-> nn.Conv2d weight [D, 3, p, p]
  LayerNorm scale                        <-> LayerNorm weight
  nn.Embed embedding / text tables       <-> nn.Embedding weight (same shape)
  other vectors, tables and scalars      <-> nn.Parameter (same shape; scalars are 0-d)

`save_pretrained` writes model.safetensors + config.json (nothing pickled), which
`MPMATorch.from_pretrained` reads back. The module always computes in float32 (a bfloat16
`model.dtype` only changes the JAX compute precision; the parameters are float32 either way).
The module needs only torch, numpy and safetensors: it loads and runs without jax, flax or
ml_collections (a ConfigDict is still accepted, read through its `to_dict`).
"""
import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np
from safetensors.torch import load_file, save_file
import torch
from torch import nn
import torch.nn.functional as F

# Only torch, numpy, safetensors (imported where used) and this pure-numpy module: the port loads
# without jax, flax or ml_collections (tests/test_torch_standalone.py checks it).
from mpma_jax.constants import CLIP_MEAN, CLIP_STD, IMAGE, TEXT, flatten, sincos_2d, unflatten

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# Batch fields read by MPMATorch.forward (as produced by mpma_jax.data.pipeline).
BATCH_KEYS = ("image", "image_keep", "image_restore", "mlm_ids", "text_ids", "text_mask")


def config_dict(model_config: Any) -> dict:
  """The model config (ConfigDict, FrozenConfigDict or nested dict) as a plain nested dict."""
  if hasattr(model_config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict (duck-typed)
    return model_config.to_dict()
  if isinstance(model_config, Mapping):
    return {
        k: config_dict(v) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v
        for k, v in model_config.items()
    }
  raise TypeError(f"model config must be a ConfigDict or a dict, got {type(model_config).__name__}")


class Section(dict):
  """A config section read by attribute (c.image.size) or as a dict (m.get("eps", 1e-6)); stands
  in for ml_collections.ConfigDict, which this module does not import."""
  def __getattr__(self, name: str):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(f"model config has no field {name!r}") from None


def _section(value: Any) -> Any:
  if isinstance(value, Mapping):
    return Section({k: _section(v) for k, v in value.items()})
  return value


def _config(model_config: Any) -> Section:
  """The model config (ConfigDict, FrozenConfigDict or nested dict) with attribute access."""
  return _section(config_dict(model_config))


# --- building blocks (mpma_jax.models.layers) -----------------------------------------------------
def quick_gelu(x):
  """CLIP's activation: x * sigmoid(1.702 x)."""
  return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # F.gelu is the exact (erf) GELU


class HeadsIn(nn.Linear):
  """x [..., D] -> [..., heads, head_dim] (JAX HeadsIn; weight [H*Dh, D])."""
  def __init__(self, width: int, heads: int, head_dim: int):
    super().__init__(width, heads * head_dim)
    self.heads, self.head_dim = heads, head_dim

  def forward(self, x):
    return super().forward(x).unflatten(-1, (self.heads, self.head_dim))  # [..., H, Dh]


class HeadsOut(nn.Linear):
  """x [..., H, Dh] -> [..., D] (JAX HeadsOut; weight [D, H*Dh])."""
  def __init__(self, heads: int, head_dim: int, width: int):
    super().__init__(heads * head_dim, width)
    self.heads, self.head_dim = heads, head_dim

  def forward(self, x):
    return super().forward(x.flatten(-2))  # [..., D]


class Table(nn.Embedding):
  """A lookup table stored in JAX as a bare parameter (not under an 'embedding' leaf)."""


class Attention(nn.Module):
  """Multi-head attention of x [B, T, D] over y [B, S, D]; mask [B, 1|H, 1|T, S], True = attend."""
  def __init__(self, width: int, heads: int, dropout: float = 0.0):
    super().__init__()
    if width % heads:
      raise ValueError(f"width {width} is not divisible by num_heads {heads}")
    head_dim = width // heads
    self.query = HeadsIn(width, heads, head_dim)
    self.key = HeadsIn(width, heads, head_dim)
    self.value = HeadsIn(width, heads, head_dim)
    self.out = HeadsOut(heads, head_dim, width)
    self.dropout = dropout

  def forward(self, x, y, mask=None):
    q = self.query(x).transpose(1, 2)  # [B, H, T, Dh]
    k = self.key(y).transpose(1, 2)  # [B, H, S, Dh]
    v = self.value(y).transpose(1, 2)  # [B, H, S, Dh]
    p = self.dropout if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, H, T, Dh]
    return self.out(out.transpose(1, 2))  # [B, T, D]


class Mlp(nn.Module):
  """Dense -> activation -> Dense, width -> hidden -> width."""
  def __init__(self, width: int, hidden: int, activation: str):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)
    self.activation = ACTIVATIONS[activation]

  def forward(self, x):
    return self.fc2(self.activation(self.fc1(x)))  # [B, T, D]


class PreLNBlock(nn.Module):
  """x + attn(ln(x)); x + mlp(ln(x)) (CLIP ViT, MAE decoder); no dropout."""
  def __init__(self, width: int, heads: int, mlp_dim: int, activation: str, eps: float):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width, eps=eps)
    self.attn = Attention(width, heads)
    self.ln_2 = nn.LayerNorm(width, eps=eps)
    self.mlp = Mlp(width, mlp_dim, activation)

  def forward(self, x, mask=None):
    h = self.ln_1(x)
    x = x + self.attn(h, h, mask)
    return x + self.mlp(self.ln_2(x))  # [B, T, D]


class PostLNBlock(nn.Module):
  """BERT layer: LN(x + self_attn); [LN(x + cross_attn(x, y))]; LN(x + mlp), dropout on branches."""
  def __init__(self, width: int, heads: int, mlp_dim: int, cross: bool, dropout: float,
               attn_dropout: float, eps: float):
    super().__init__()
    self.attn = Attention(width, heads, attn_dropout)
    self.attn_ln = nn.LayerNorm(width, eps=eps)
    if cross:
      self.cross_attn = Attention(width, heads, attn_dropout)
      self.cross_ln = nn.LayerNorm(width, eps=eps)
    self.cross = cross
    self.mlp = Mlp(width, mlp_dim, "gelu")
    self.mlp_ln = nn.LayerNorm(width, eps=eps)
    self.drop = nn.Dropout(dropout)

  def forward(self, x, mask=None, y=None, y_mask=None):
    x = self.attn_ln(x + self.drop(self.attn(x, x, mask)))
    if self.cross:
      x = self.cross_ln(x + self.drop(self.cross_attn(x, y, y_mask)))
    return self.mlp_ln(x + self.drop(self.mlp(x)))  # [B, T, D]


def key_mask(valid):
  """[B, S] validity of keys -> bool attention mask [B, 1, 1, S]."""
  return valid.bool()[:, None, None, :]


# --- encoders -------------------------------------------------------------------------------------
def normalize_images(images):
  """uint8 images [B, H, W, 3] -> CLIP-normalised float32 [B, H, W, 3]."""
  x = images.to(torch.float32) / 255.0
  mean = torch.as_tensor(CLIP_MEAN, device=x.device)
  std = torch.as_tensor(CLIP_STD, device=x.device)
  return (x - mean) / std


class VisionTransformer(nn.Module):
  """images [B, H, W, 3] (normalised), keep [B, n] or None -> tokens [B, 1 + n, width]."""
  def __init__(self, size: int, patch: int, width: int, layers: int, heads: int, mlp_ratio: float):
    super().__init__()
    if size % patch:
      raise ValueError(f"image.size {size} is not divisible by image.patch {patch}")
    self.size, self.width = size, width
    num_patches = (size // patch)**2
    self.patch_embed = nn.Conv2d(3, width, patch, stride=patch, bias=False)
    self.class_embedding = nn.Parameter(torch.zeros(width))
    self.position_embedding = nn.Parameter(torch.zeros(1 + num_patches, width))
    self.ln_pre = nn.LayerNorm(width, eps=1e-5)
    for i in range(layers):
      self.add_module(f"block_{i}",
                      PreLNBlock(width, heads, int(width * mlp_ratio), "quick_gelu", 1e-5))
    self.layers = layers
    self.ln_post = nn.LayerNorm(width, eps=1e-5)

  def forward(self, images, keep=None):
    b, h, w, _ = images.shape
    if (h, w) != (self.size, self.size):
      raise ValueError(f"image is {h}x{w}, the ViT was built for {self.size}")
    x = self.patch_embed(images.permute(0, 3, 1, 2))  # [B, D, h/p, w/p]
    x = x.flatten(2).transpose(1, 2)  # [B, N, D]
    x = x + self.position_embedding[1:]
    if keep is not None:
      x = torch.gather(x, 1, keep.long()[:, :, None].expand(-1, -1, self.width))  # [B, n, D]
    cls = (self.class_embedding + self.position_embedding[0]).expand(b, 1, self.width)
    x = self.ln_pre(torch.cat([cls, x], dim=1))  # [B, 1 + n, D]
    for i in range(self.layers):
      x = getattr(self, f"block_{i}")(x)
    return self.ln_post(x)  # [B, 1 + n, D]


def position_ids(attention_mask, style: str, pad_id: int):
  """attention_mask [B, L] -> position ids [B, L] for 'bert' or 'roberta' (as text.position_ids)."""
  mask = attention_mask.long()
  if style == "bert":
    return torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
  if style == "roberta":
    return torch.cumsum(mask, dim=1) * mask + pad_id
  raise ValueError(f"text.position_style must be 'bert' or 'roberta', got {style!r}")


class TextEncoder(nn.Module):
  """ids [B, L], attention_mask [B, L] -> tokens [B, L, width] (BERT/RoBERTa, post-LN)."""
  def __init__(self, t: Section):
    super().__init__()
    self.word_embeddings = Table(t.vocab_size, t.width)
    self.position_embeddings = Table(t.max_positions, t.width)
    self.token_type_embeddings = Table(t.type_vocab_size, t.width)
    self.embeddings_ln = nn.LayerNorm(t.width, eps=t.eps)
    self.drop = nn.Dropout(t.dropout)
    for i in range(t.layers):
      self.add_module(
          f"layer_{i}",
          PostLNBlock(t.width, t.heads, t.mlp_dim, False, t.dropout, t.attn_dropout, t.eps))
    self.layers, self.style, self.pad_id = t.layers, t.position_style, t.pad_id

  def forward(self, ids, attention_mask):
    pos = position_ids(attention_mask, self.style, self.pad_id)  # [B, L]
    ids = ids.long()
    x = self.word_embeddings(ids) + self.position_embeddings(pos)  # [B, L, D]
    x = x + self.token_type_embeddings(torch.zeros_like(ids))
    x = self.drop(self.embeddings_ln(x))
    mask = key_mask(attention_mask)  # [B, 1, 1, L]
    for i in range(self.layers):
      x = getattr(self, f"layer_{i}")(x, mask)
    return x  # [B, L, D]


# --- cross-modal parts ----------------------------------------------------------------------------
class Memory(nn.Module):
  """MA-CMF top-k memory read: x [B, L, D] -> response [B, L, D] (mpma_jax.models.memory)."""
  def __init__(self, width: int, slots: int, topk: int, heads: int, impl: str):
    super().__init__()
    if width % heads:
      raise ValueError(f"memory: width {width} is not divisible by memory.heads {heads}")
    if not 1 <= topk <= slots:
      raise ValueError(f"memory.topk must be in [1, memory.slots={slots}], got {topk}")
    if impl not in ("masked", "gather"):
      raise ValueError(f"memory.impl must be 'masked' or 'gather', got {impl!r}")
    head_dim = width // heads
    self.memory = nn.Parameter(torch.zeros(slots, width))
    self.query = HeadsIn(width, heads, head_dim)
    self.key = HeadsIn(width, heads, head_dim)
    self.value = HeadsIn(width, heads, head_dim)
    self.out = HeadsOut(heads, head_dim, width)
    self.topk, self.impl, self.head_dim = topk, impl, head_dim

  def forward(self, x):
    q = self.query(x)  # [B, L, H, Dh]
    k = self.key(self.memory)  # [S, H, Dh]
    v = self.value(self.memory)  # [S, H, Dh]
    scores = torch.einsum("blhd,shd->bhls", q, k) / math.sqrt(self.head_dim)  # [B, H, L, S]
    top_scores, top_idx = torch.topk(scores, self.topk, dim=-1)  # [B, H, L, k]
    if self.impl == "masked":
      kth = top_scores[..., -1:]  # [B, H, L, 1]
      weights = torch.softmax(scores.masked_fill(scores < kth, -math.inf), dim=-1)
      out = torch.einsum("bhls,shd->blhd", weights, v)  # [B, L, H, Dh]
    else:
      weights = torch.softmax(top_scores, dim=-1)  # [B, H, L, k]
      heads = torch.arange(v.shape[1], device=v.device)[None, :, None, None]
      picked = v.transpose(0, 1)[heads, top_idx]  # [B, H, L, k, Dh]
      out = torch.einsum("bhlk,bhlkd->blhd", weights, picked)  # [B, L, H, Dh]
    return self.out(out)  # [B, L, D]


class CoAttentionFusion(nn.Module):
  """text [B, L, D], image [B, 1+n, D] -> dict(text, image, image_at_mim_layer)."""
  def __init__(self, width: int, f: Section, mim_layer: int):
    super().__init__()
    if not 1 <= mim_layer <= f.layers:
      raise ValueError(f"mim.layer must be in [1, fusion.layers={f.layers}], got {mim_layer}")
    for i in range(f.layers):
      for stream in ("text", "image"):
        self.add_module(
            f"{stream}_layer_{i}",
            PostLNBlock(width, f.heads, f.mlp_dim, True, f.dropout, f.attn_dropout, 1e-12))
    self.layers, self.mim_layer = f.layers, mim_layer

  def forward(self, text, text_mask, image, memory: Optional[Memory] = None):
    t_keys = key_mask(text_mask)  # [B, 1, 1, L]; every image token is valid (no mask)
    image_at_mim = None
    for i in range(self.layers):
      if memory is not None:
        text = text + memory(text)
      new_text = getattr(self, f"text_layer_{i}")(text, t_keys, image, None)
      new_image = getattr(self, f"image_layer_{i}")(image, None, text, t_keys)
      text, image = new_text, new_image  # [B, L, D], [B, 1+n, D]
      if i + 1 == self.mim_layer:
        image_at_mim = image
    return {"text": text, "image": image, "image_at_mim_layer": image_at_mim}


class Pooler(nn.Module):
  """Dense d->d + tanh on token 0."""
  def __init__(self, width: int):
    super().__init__()
    self.dense = nn.Linear(width, width)

  def forward(self, x):
    return torch.tanh(self.dense(x[:, 0]))  # [B, D]


def l2_normalize(x, eps: float = 1e-6):
  """x / sqrt(|x|^2 + eps) over the last axis, as gla.l2_normalize."""
  x = x.to(torch.float32)
  return x * torch.rsqrt(torch.sum(x * x, dim=-1, keepdim=True) + eps)


class GLAHeads(nn.Module):
  """Per-modality d->G heads (L2-normalised) and the two learnable log temperatures."""
  def __init__(self, width: int, g: Section):
    super().__init__()
    self.image_head = nn.Linear(width, g.dim)
    self.text_head = nn.Linear(width, g.dim)
    init = torch.tensor(math.log(g.temperature_init), dtype=torch.float32)
    self.log_temperature_global = nn.Parameter(init.clone())
    self.log_temperature_local = nn.Parameter(init.clone())
    self.temperature_min = g.temperature_min

  def forward(self, image_tokens, text_tokens):
    return l2_normalize(self.image_head(image_tokens)), l2_normalize(self.text_head(text_tokens))

  def temperatures(self):
    """(global, local) temperatures, 0-d, clamped to >= temperature_min in value; the gradient is
    that of exp (straight through the clamp), as gla.GLAHeads.temperatures."""
    def clamp(log_t):
      t = torch.exp(log_t)
      return torch.clamp(t, min=self.temperature_min).detach() + (t - t.detach())

    return clamp(self.log_temperature_global), clamp(self.log_temperature_local)


# --- heads ----------------------------------------------------------------------------------------
class MIMDecoder(nn.Module):
  """image stream [B, 1+n, D], restore [B, N] -> predicted patches [B, N, p*p*3]."""
  def __init__(self, in_width: int, num_patches: int, patch_pixels: int, m: Section):
    super().__init__()
    self.num_patches, self.width, self.depth = num_patches, m.width, m.depth
    self.embed = nn.Linear(in_width, m.width)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, m.width))
    grid = int(round(math.sqrt(num_patches)))
    self.register_buffer("pos", torch.from_numpy(sincos_2d(grid, m.width)), persistent=False)
    for i in range(m.depth):
      self.add_module(
          f"block_{i}",
          PreLNBlock(m.width, m.heads, int(m.width * 4.0), m.get("activation", "gelu"),
                     m.get("eps", 1e-6)))
    self.ln = nn.LayerNorm(m.width, eps=m.get("eps", 1e-6))
    self.pred = nn.Linear(m.width, patch_pixels)

  def forward(self, x, restore):
    b = x.shape[0]
    x = self.embed(x)  # [B, 1+n, W]
    n_masked = self.num_patches - (x.shape[1] - 1)
    fill = self.mask_token.expand(b, n_masked, self.width)  # [B, N-n, W]
    patches = torch.cat([x[:, 1:], fill], dim=1)  # [B, N, W], kept first, then masked
    index = restore.long()[:, :, None].expand(-1, -1, self.width)
    patches = torch.gather(patches, 1, index)  # [B, N, W], original order
    x = torch.cat([x[:, :1], patches], dim=1) + self.pos  # [B, 1+N, W]
    for i in range(self.depth):
      x = getattr(self, f"block_{i}")(x)
    return self.pred(self.ln(x)[:, 1:])  # [B, N, p*p*3]


class MLMHead(nn.Module):
  """text stream [B, L, D] -> logits [B, L, V]: dense + GELU + LayerNorm, then vocab + bias."""
  def __init__(self, width: int, vocab_size: int, eps: float):
    super().__init__()
    self.transform = nn.Linear(width, width)
    self.ln = nn.LayerNorm(width, eps=eps)
    self.decoder = nn.Linear(width, vocab_size)

  def forward(self, x):
    return self.decoder(self.ln(F.gelu(self.transform(x))))  # [B, L, V]


class ITMHead(nn.Module):
  """joint feature [B, 2D] -> match logits [B, 2]."""
  def __init__(self, width: int):
    super().__init__()
    self.fc = nn.Linear(2 * width, 2)

  def forward(self, joint):
    return self.fc(joint)


# --- the model ------------------------------------------------------------------------------------
class MPMATorch(nn.Module):
  """The JAX `MPMA` in PyTorch; built from the `model` config section (ConfigDict or dict)."""
  def __init__(self, model_config: Any):
    super().__init__()
    self.config = config_dict(model_config)
    c = _config(model_config)
    i, t, f, m = c.image, c.text, c.fusion, c.memory
    if m.placement not in ("pre_fusion", "every_text_layer"):
      raise ValueError(f"memory.placement must be 'pre_fusion' or 'every_text_layer', "
                       f"got {m.placement!r}")
    if c.gla.features_from not in ("clean", "masked"):
      raise ValueError(f"gla.features_from must be 'clean' or 'masked', "
                       f"got {c.gla.features_from!r}")
    self.image_encoder = VisionTransformer(i.size, i.patch, i.width, i.layers, i.heads, i.mlp_ratio)
    self.text_encoder = TextEncoder(t)
    self.image_proj = nn.Linear(i.width, c.hidden)
    self.text_proj = nn.Linear(t.width, c.hidden)
    self.modality_type = nn.Embedding(2, c.hidden)
    self.memory = Memory(c.hidden, m.slots, m.topk, m.heads, m.impl) if m.enabled else None
    self.fusion = CoAttentionFusion(c.hidden, f, c.mim.layer)
    self.text_pooler = Pooler(c.hidden)
    self.image_pooler = Pooler(c.hidden)
    self.gla = GLAHeads(c.hidden, c.gla)
    num_patches = (i.size // i.patch)**2
    self.mim_decoder = MIMDecoder(c.hidden, num_patches, i.patch * i.patch * 3, c.mim)
    # model.mlm.eps; configs saved before that field tied the head to the text encoder's eps.
    self.mlm_head = MLMHead(c.hidden, t.vocab_size, c.get("mlm", {}).get("eps", t.eps))
    self.itm_head = ITMHead(c.hidden)
    self.placement, self.features_from = m.placement, c.gla.features_from
    self.reset_parameters(c)

  @torch.no_grad()
  def reset_parameters(self, c: Section):
    """The JAX initialisation's distributions: normal(0.02) weights, zero biases, unit LN scales,
    memory normal(1/d), log temperatures at log(temperature_init)."""
    for mod in self.modules():
      for name, p in mod.named_parameters(recurse=False):
        if isinstance(mod, nn.LayerNorm) and name == "weight":
          nn.init.ones_(p)
        elif name == "bias":
          nn.init.zeros_(p)
        elif name == "memory":
          nn.init.normal_(p, std=1.0 / c.hidden)
        elif name.startswith("log_temperature"):
          p.fill_(math.log(c.gla.temperature_init))
        else:
          nn.init.normal_(p, std=0.02)

  @classmethod
  def from_params(cls, params: Any, model_config: Any) -> "MPMATorch":
    """The module (in eval mode) holding a JAX parameter tree."""
    model = cls(model_config)
    model.load_checked(state_dict_from_params(params, model_config))
    return model.eval()

  @classmethod
  def from_pretrained(cls, path: str) -> "MPMATorch":
    """Builds the module from path/config.json and loads path/model.safetensors strictly."""
    with open(os.path.join(path, CONFIG_FILE)) as fh:
      model = cls(json.load(fh))
    model.load_checked(load_file(os.path.join(path, WEIGHTS_FILE)))
    return model.eval()

  def load_checked(self, state_dict: Mapping[str, torch.Tensor]):
    """load_state_dict(strict) after checking names and shapes (ValueError naming the tensor)."""
    layout = {k: v[0] for k, v in _jax_layout(self).items()}
    _check_names_and_shapes(state_dict, {k: tuple(v.shape) for k, v in self.state_dict().items()},
                            layout)
    self.load_state_dict(state_dict, strict=True)

  # --- uni-modal -------------------------------------------------------------------------------
  def embed_image(self, images, keep=None):
    """uint8 images [B, H, W, 3] (+ keep [B, n]) -> projected tokens [B, 1+n, d]."""
    x = self.image_encoder(normalize_images(images), keep)  # [B, 1+n, Dv]
    return self.image_proj(x) + self.modality_type.weight[IMAGE]  # [B, 1+n, d]

  def embed_text(self, ids, attention_mask):
    """ids, attention_mask [B, L] -> projected tokens [B, L, d]."""
    x = self.text_encoder(ids, attention_mask)  # [B, L, Dt]
    return self.text_proj(x) + self.modality_type.weight[TEXT]  # [B, L, d]

  def align(self, image_tokens, text_tokens):
    """GLA embeddings (L2-normalised): image [B, 1+P, G], text [B, L, G]."""
    return self.gla(image_tokens, text_tokens)

  # --- cross-modal -----------------------------------------------------------------------------
  def fuse(self, image_tokens, text_tokens, text_mask):
    """Memory read + co-attention fusion -> dict(text, image, image_at_mim_layer)."""
    per_layer_memory = None
    if self.memory is not None:
      image_tokens = image_tokens + self.memory(image_tokens)  # V' = V + Mem(V)
      if self.placement == "pre_fusion":
        text_tokens = text_tokens + self.memory(text_tokens)  # T' = T + Mem(T)
      else:
        per_layer_memory = self.memory
    return self.fusion(text_tokens, text_mask, image_tokens, per_layer_memory)

  def joint_feature(self, fused):
    """Pooled text [CLS] ⊕ pooled image [CLS] -> [B, 2d]."""
    return torch.cat([self.text_pooler(fused["text"]), self.image_pooler(fused["image"])], dim=-1)

  def itm_logits(self, image_tokens, text_tokens, text_mask):
    """Match logits [B, 2] of (image, text) pairs."""
    return self.itm_head(self.joint_feature(self.fuse(image_tokens, text_tokens, text_mask)))

  # --- pre-training ----------------------------------------------------------------------------
  def forward(self, batch: Mapping[str, Any]) -> dict:
    """Paired-masking forward pass (JAX MPMA.__call__ without ITM): mim_pred [B, N, p*p*3],
    mlm_logits [B, L, V], image_gla [B, 1+P, G], text_gla [B, L, G], temperature_global/local."""
    dev = self.modality_type.weight.device
    b = {
        k: v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v), device=dev)
        for k, v in batch.items() if k in BATCH_KEYS
    }
    image = self.embed_image(b["image"], b["image_keep"])  # [B, 1+n, d]
    text = self.embed_text(b["mlm_ids"], b["text_mask"])  # [B, L, d]
    if self.features_from == "clean":  # a second, unmasked encoder pass
      clean_image = self.embed_image(b["image"])  # [B, 1+N, d]
      clean_text = self.embed_text(b["text_ids"], b["text_mask"])  # [B, L, d]
    else:
      clean_image, clean_text = image, text
    image_gla, text_gla = self.align(clean_image, clean_text)
    t_global, t_local = self.gla.temperatures()
    fused = self.fuse(image, text, b["text_mask"])
    return {
        "mim_pred": self.mim_decoder(fused["image_at_mim_layer"], b["image_restore"]),
        "mlm_logits": self.mlm_head(fused["text"]),
        "image_gla": image_gla,
        "text_gla": text_gla,
        "temperature_global": t_global,
        "temperature_local": t_local,
    }


# --- parameter conversion -------------------------------------------------------------------------
# Bare JAX parameters (no kernel/bias/scale/embedding leaf) kept as they are; the text tables
# become nn.Embedding weights.
_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")
_BARE = ("class_embedding", "position_embedding", "mask_token", "memory", "log_temperature_global",
         "log_temperature_local") + _TABLES


def _rule(path: str, ndim: int) -> tuple[str, str]:
  """JAX path and rank -> (torch name, layout kind); ValueError for a parameter no rule covers."""
  parts = path.split("/")
  prefix, leaf = ".".join(parts[:-1]), parts[-1]
  join = lambda name: f"{prefix}.{name}" if prefix else name
  if leaf == "kernel":
    kind = {4: "conv", 2: "dense"}.get(ndim)
    if ndim == 3:
      kind = "heads_out" if parts[-2] == "out" else "heads_in"
    if kind is None:
      raise ValueError(f"parameter {path!r}: a kernel of rank {ndim} has no PyTorch layout "
                       "(expected rank 2, 3 or 4)")
    return join("weight"), kind
  if leaf == "bias":
    return join("bias"), "heads_bias" if ndim == 2 else "same"
  if leaf in ("scale", "embedding"):
    return join("weight"), "same"
  if leaf in _TABLES:
    return join(f"{leaf}.weight"), "same"
  if leaf in _BARE:
    return join(leaf), "same"
  raise ValueError(f"parameter {path!r} has no PyTorch name (unknown leaf {leaf!r}; expected "
                   f"kernel, bias, scale, embedding or one of {', '.join(_BARE)})")


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "dense":
    return x.T  # [in, out] -> [out, in]
  if kind == "heads_in":
    return x.reshape(x.shape[0], -1).T  # [D, H, Dh] -> [H*Dh, D]
  if kind == "heads_out":
    return x.reshape(-1, x.shape[-1]).T  # [H, Dh, D] -> [D, H*Dh]
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)  # [p, p, 3, D] -> [D, 3, p, p]
  if kind == "heads_bias":
    return x.reshape(-1)  # [H, Dh] -> [H*Dh]
  return x


def _to_jax(x: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
  if kind in ("dense", "heads_in", "heads_out"):
    return x.T.reshape(shape)
  if kind == "conv":
    return x.transpose(2, 3, 1, 0)  # [D, 3, p, p] -> [p, p, 3, D]
  return x.reshape(shape)


def _jax_layout(model: MPMATorch) -> dict[str, tuple[str, str, tuple]]:
  """torch name -> (JAX path, layout kind, JAX shape), from the module types."""
  layout = {}
  for mod_name, mod in model.named_modules():
    base = mod_name.replace(".", "/")
    for p_name, p in mod.named_parameters(recurse=False):
      leaf, kind, shape = p_name, "same", tuple(p.shape)  # bare parameters stay as they are
      if isinstance(mod, HeadsIn):
        leaf, kind, shape = (("kernel", "heads_in", (mod.in_features, mod.heads,
                                                     mod.head_dim)) if p_name == "weight" else
                             ("bias", "heads_bias", (mod.heads, mod.head_dim)))
      elif isinstance(mod, HeadsOut) and p_name == "weight":
        leaf, kind, shape = "kernel", "heads_out", (mod.heads, mod.head_dim, mod.out_features)
      elif isinstance(mod, nn.Linear) and p_name == "weight":
        leaf, kind, shape = "kernel", "dense", shape[::-1]
      elif isinstance(mod, nn.Conv2d):
        leaf, kind, shape = "kernel", "conv", (shape[2], shape[3], shape[1], shape[0])
      elif isinstance(mod, nn.LayerNorm) and p_name == "weight":
        leaf = "scale"
      elif isinstance(mod, Table):
        leaf = None  # the table is the module itself: 'text_encoder/word_embeddings'
      elif isinstance(mod, nn.Embedding):
        leaf = "embedding"
      path = "/".join(part for part in (base, leaf) if part)
      layout[f"{mod_name}.{p_name}" if mod_name else p_name] = (path, kind, shape)
  return layout


def _check_names_and_shapes(got: Mapping[str, Any], want: Mapping[str, tuple],
                            jax_paths: Optional[Mapping[str, str]] = None):
  """ValueError naming the missing / unexpected tensors, or the first one with a wrong shape."""
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"state dict does not match the model: missing {missing}, "
                     f"unexpected {extra}")
  for name, shape in want.items():
    if tuple(got[name].shape) != tuple(shape):
      where = f" (JAX {jax_paths[name]!r})" if jax_paths and name in jax_paths else ""
      raise ValueError(f"tensor {name!r}{where} has shape {tuple(got[name].shape)}, the model "
                       f"expects {tuple(shape)}")


def _meta_model(model_config: Any) -> MPMATorch:
  """MPMATorch without storage, for its names and shapes."""
  with torch.device("meta"):
    return MPMATorch(model_config)


def state_dict_from_params(params: Any, model_config: Any = None) -> dict[str, torch.Tensor]:
  """JAX parameter tree (unboxed) -> MPMATorch state dict of float32 CPU tensors.

  With model_config, the names and shapes are also checked against MPMATorch(model_config).
  """
  out, origin = {}, {}
  for path, value in flatten(params).items():
    value = np.asarray(value, np.float32)
    name, kind = _rule(path, value.ndim)
    out[name] = torch.from_numpy(np.array(_to_torch(value, kind), np.float32, order="C"))
    origin[name] = path
  if model_config is not None:
    want = _meta_model(model_config).state_dict()
    _check_names_and_shapes(out, {k: tuple(v.shape) for k, v in want.items()}, origin)
  return out


def params_from_state_dict(state_dict: Mapping[str, Any], model_config: Any) -> Any:
  """MPMATorch state dict -> JAX parameter tree of float32 numpy arrays (exact inverse)."""
  model = _meta_model(model_config)
  layout = _jax_layout(model)
  _check_names_and_shapes(state_dict, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                          {k: v[0] for k, v in layout.items()})
  flat = {}
  for name, (path, kind, shape) in layout.items():
    value = state_dict[name]
    value = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    flat[path] = np.array(_to_jax(value.astype(np.float32, copy=False), kind, shape), np.float32,
                          order="C")
  return unflatten(flat)


def save_pretrained(params: Any, model_config: Any, out_dir: str):
  """Writes out_dir/model.safetensors and out_dir/config.json (the model config)."""
  state = state_dict_from_params(params, model_config)
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, WEIGHTS_FILE))
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as fh:
    json.dump(config_dict(model_config), fh, indent=2, sort_keys=True)
