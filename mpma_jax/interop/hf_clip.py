"""Hugging Face CLIP vision tower <-> the JAX image encoder (`image_encoder/*`).

HF's CLIPVisionModel and our VisionTransformer are the same network (conv patch embedding without
bias, class token, learned positions, pre_layrnorm = ln_pre, pre-LN QuickGELU blocks), except
that HF's `last_hidden_state` is taken *before* `post_layernorm`, which HF applies to the CLS
token only (`pooler_output`); our ViT applies ln_post to every token. So
ours == post_layernorm(last_hidden_state) and ours[:, 0] == pooler_output.

Checkpoint keys are read with or without the 'vision_model.' prefix (a CLIPModel, or a
CLIPVisionModel saved by transformers 4); CLIPModel's text tower, projections and logit_scale are
reported as skipped. Exports are written with the prefix, which transformers 4 and 5 both load.
"""
import os
import re
from typing import Any

import numpy as np
import transformers

from mpma_jax.interop import common
from mpma_jax.models.vit import resize_pos_embed

PREFIX = "vision_model."
SCOPE = "image_encoder/"
EPS = 1e-5  # the JAX ViT's LayerNorm epsilon


def _table(layers: int, heads: int) -> list[tuple[str, str, common.Layout]]:
  """(JAX parameter path, HF name without prefix, layout) for every tensor but the positions."""
  rows = [("patch_embed/kernel", "embeddings.patch_embedding.weight", common.CONV),
          ("class_embedding", "embeddings.class_embedding", common.SAME)]
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    rows += [(f"{ours}/scale", f"{theirs}.weight", common.SAME),
             (f"{ours}/bias", f"{theirs}.bias", common.SAME)]
  for i in range(layers):
    ours, theirs = f"block_{i}", f"encoder.layers.{i}"
    for ln, hf_ln in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
      rows += [(f"{ours}/{ln}/scale", f"{theirs}.{hf_ln}.weight", common.SAME),
               (f"{ours}/{ln}/bias", f"{theirs}.{hf_ln}.bias", common.SAME)]
    for proj, hf_proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      rows += [(f"{ours}/attn/{proj}/kernel", f"{theirs}.self_attn.{hf_proj}.weight",
                common.heads_in(heads)),
               (f"{ours}/attn/{proj}/bias", f"{theirs}.self_attn.{hf_proj}.bias",
                common.heads_bias(heads))]
    rows += [(f"{ours}/attn/out/kernel", f"{theirs}.self_attn.out_proj.weight",
              common.heads_out(heads)),
             (f"{ours}/attn/out/bias", f"{theirs}.self_attn.out_proj.bias", common.SAME)]
    for fc in ("fc1", "fc2"):
      rows += [(f"{ours}/mlp/{fc}/kernel", f"{theirs}.mlp.{fc}.weight", common.LINEAR),
               (f"{ours}/mlp/{fc}/bias", f"{theirs}.mlp.{fc}.bias", common.SAME)]
  return rows


def hf_vision_config(path: str):
  """The transformers CLIPVisionConfig of a CLIPVisionModel / CLIPModel directory, or None when
  `path` is not a directory with a config.json."""
  if not (os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))):
    return None
  # A CLIPModel's config.json nests the tower's config under 'vision_config'; this reads either.
  return transformers.CLIPVisionConfig.from_pretrained(path)


def check_config(path: str, image_config: Any):
  """Raises ValueError naming the field when the HF config at `path` differs from model.image
  (image_size may differ: the position embedding is resized; the checkpoint may have more blocks
  than model.image.layers: the first ones are imported)."""
  hf = hf_vision_config(path)
  if hf is None:
    return
  c = image_config
  source = os.path.join(path, "config.json")
  if hf.num_hidden_layers < c.layers:
    raise ValueError(f"{source}: num_hidden_layers is {hf.num_hidden_layers} but "
                     f"model.image.layers is {c.layers} (at most the checkpoint's depth)")
  pairs = [("hidden_size", hf.hidden_size, "model.image.width", c.width),
           ("num_attention_heads", hf.num_attention_heads, "model.image.heads", c.heads),
           ("patch_size", hf.patch_size, "model.image.patch", c.patch),
           ("intermediate_size", hf.intermediate_size, "int(model.image.width * mlp_ratio)",
            int(c.width * c.mlp_ratio)),
           ("num_channels", hf.num_channels, "the ViT's RGB input", 3),
           ("hidden_act", hf.hidden_act, "the ViT's activation", "quick_gelu"),
           ("layer_norm_eps", hf.layer_norm_eps, "the ViT's LayerNorm epsilon", EPS)]
  for hf_field, hf_value, field, value in pairs:
    if hf_value != value:
      raise ValueError(f"{source}: {hf_field} is {hf_value!r} but {field} is {value!r}")


def _prefix(state: dict[str, np.ndarray], source: str) -> str:
  for prefix in (PREFIX, ""):
    if prefix + "embeddings.patch_embedding.weight" in state:
      return prefix
  raise KeyError(f"{source}: no CLIP vision tower found (expected a tensor "
                 f"'{PREFIX}embeddings.patch_embedding.weight' or "
                 "'embeddings.patch_embedding.weight')")


def _num_layers(state: dict[str, np.ndarray], prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
  found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
  return max(found) + 1 if found else 0


def import_clip_vision(path: str, params: Any,
                       image_config: Any) -> tuple[Any, common.ImportReport]:
  """Writes a HF CLIP vision tower (directory or weight file) into params['image_encoder'].

  params: the model's (unboxed) parameter tree; other subtrees come back as they were.
  image_config: the `model.image` config section. A checkpoint deeper than image.layers gives its
  first image.layers blocks (M3AE keeps 11 of CLIP ViT-B/16's 12); the others are reported as
  skipped and in a note. The position embedding is resized (image.pos_resize, CLS row kept) when
  the checkpoint's patch grid differs from image.size / image.patch.
  """
  check_config(path, image_config)
  state = common.load_state_dict(path)
  prefix = _prefix(state, path)
  layers = _num_layers(state, prefix)
  if layers < image_config.layers:
    raise ValueError(f"{path}: checkpoint has {layers} encoder layers but model.image.layers is "
                     f"{image_config.layers} (at most the checkpoint's depth)")
  w = common.Writer(common.flatten(params), state, path)
  n = image_config.layers
  if layers > n:  # the first n blocks are imported, the others stay in report.skipped
    unused = f"{n}" if layers == n + 1 else f"{n}..{layers - 1}"
    w.report.notes.append(f"model.image.layers is {n}: blocks 0..{n - 1} of the checkpoint's "
                          f"{layers} imported, {prefix}encoder.layers.{unused} not used")
  for ours, theirs, layout in _table(image_config.layers, image_config.heads):
    w.put(SCOPE + ours, prefix + theirs, layout.to_jax)
  name = prefix + "embeddings.position_embedding.weight"
  pos = w.get(name)  # [1 + g*g, D]
  grid = image_config.size // image_config.patch
  if pos.shape[0] != 1 + grid * grid:
    old = int(round(np.sqrt(pos.shape[0] - 1)))
    pos = resize_pos_embed(pos, grid, image_config.pos_resize)  # [1 + grid*grid, D]
    w.report.notes.append(f"{name}: {old}x{old} patch grid resized to {grid}x{grid} with "
                          f"{image_config.pos_resize} (CLS row kept)")
  w.put(SCOPE + "position_embedding", name, value=pos)
  return w.finish(SCOPE)


def export_clip_vision(params: Any, image_config: Any, out_dir: str) -> str:
  """Writes params['image_encoder'] as a HF CLIPVisionModel directory (config.json,
  model.safetensors) that `CLIPVisionModel.from_pretrained(out_dir)` loads completely.
  Returns out_dir."""
  c = image_config
  flat = common.flatten(params)
  missing = [p for p in ("patch_embed/kernel", "position_embedding") if SCOPE + p not in flat]
  if missing:
    raise KeyError(f"params has no {SCOPE}{missing[0]}: expected the whole model's parameter "
                   "tree with an image encoder")
  tensors = {
      PREFIX + theirs: layout.to_torch(np.asarray(flat[SCOPE + ours]))
      for ours, theirs, layout in _table(c.layers, c.heads)
  }
  tensors[PREFIX + "embeddings.position_embedding.weight"] = np.asarray(flat[SCOPE +
                                                                             "position_embedding"])
  config = transformers.CLIPVisionConfig(hidden_size=c.width,
                                         intermediate_size=int(c.width * c.mlp_ratio),
                                         num_hidden_layers=c.layers, num_attention_heads=c.heads,
                                         num_channels=3, image_size=c.size, patch_size=c.patch,
                                         hidden_act="quick_gelu", layer_norm_eps=EPS,
                                         architectures=["CLIPVisionModel"])
  os.makedirs(out_dir, exist_ok=True)
  config.save_pretrained(out_dir)
  # position_ids is a non-persistent buffer in transformers 5 (and ignored when found in
  # transformers 4), so it is not written.
  common.save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))
  return out_dir
