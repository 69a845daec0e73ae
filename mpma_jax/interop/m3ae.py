"""M3AE's PyTorch Lightning checkpoint <-> the JAX MPMA parameter tree.

M3AE (github.com/zhjohnchan/M3AE, `M3AETransformerSS`) is the backbone MPMA extends, so every part
of it has a counterpart here; memory/* and gla/* are MPMA's own and keep their fresh values.

  M3AE ('state_dict' key prefix)                   ours
  vision_encoder.visual.*  (OpenAI CLIP names)     image_encoder/*  (fused in_proj -> q, k, v)
  language_encoder.{embeddings,encoder}.*          text_encoder/*    (RoBERTa)
  multi_modal_{language,vision}_proj               text_proj, image_proj
  modality_type_embeddings (0 = text, 1 = image)   modality_type/embedding
  multi_modal_language_layers.{i} (BertCrossLayer) fusion/text_layer_{i}  (text attends to image)
  multi_modal_vision_layers.{i}                    fusion/image_layer_{i} (image attends to text)
  multi_modal_{language,vision}_pooler.dense       text_pooler/dense, image_pooler/dense
  mlm_head.{transform.dense,transform.LayerNorm,   mlm_head/{transform,ln,decoder}
            decoder (no bias), bias}
  itm_head.fc                                      itm_head/fc
  mim_head.{decoder_embed,mask_token,              mim_decoder/{embed,mask_token,block_{i},ln,pred}
            decoder.resblocks.{i},decoder_norm,decoder_pred}

Skipped: the fixed `mim_head.decoder_pos_embed` (checked against our computed sin-cos positions),
the CLIP text-tower leftovers M3AE's CLIP class still builds (`vision_encoder.token_embedding`,
`.positional_embedding`, `.ln_final`), RoBERTa's own unused pooler and integer buffers, and the
fine-tuning heads (vqa_head, cls_head, irtr_head).

Facts from M3AE's code that the config must match (checked, with errors naming the field): its
CLIP Transformer builds `layers - 1` blocks (11 for ViT-B/16) with width // 64 heads and no
visual projection; the text encoder is RoBERTa (positions from pad_id + 1 = 2). The head counts of
the text encoder, fusion and MIM decoder are not visible in the weights (M3AE: 12, 12, 6).
"""
import re
from typing import Any

import numpy as np

from mpma_jax.interop import common
from mpma_jax.models.decoders import sincos_2d
from mpma_jax.models.vit import resize_pos_embed

VISUAL = "vision_encoder.visual."
TEXT = "language_encoder."
POS = VISUAL + "positional_embedding"
DECODER_POS = "mim_head.decoder_pos_embed"
HEADS = ("mlm_head", "mim_head", "itm_head")  # M3AE builds these only when their loss is on
_SITE = {"mlm_head": "mlm_head/", "mim_head": "mim_decoder/", "itm_head": "itm_head/"}
CLIP_HEAD_WIDTH = 64  # M3AE's build_model: heads = width // 64
TEXT_EPS = 1e-5  # roberta-base's layer_norm_eps (M3AE loads it with from_pretrained)
BERT_EPS = 1e-12  # RobertaConfig's default, used by M3AE's fusion layers and MLM head
CLIP_EPS = 1e-5  # nn.LayerNorm's default, used by CLIP's blocks (also in M3AE's MIM decoder)

Row = tuple[str, str, common.Layout]  # (our path, M3AE key, layout)
Fused = tuple[str, str, int]  # (our attention prefix, M3AE nn.MultiheadAttention prefix, heads)


# --- the mapping ---------------------------------------------------------------------------------
def _dense(ours: str, theirs: str) -> list[Row]:
  return [(f"{ours}/kernel", f"{theirs}.weight", common.LINEAR),
          (f"{ours}/bias", f"{theirs}.bias", common.SAME)]


def _ln(ours: str, theirs: str) -> list[Row]:
  return [(f"{ours}/scale", f"{theirs}.weight", common.SAME),
          (f"{ours}/bias", f"{theirs}.bias", common.SAME)]


def _bert_attention(ours: str, ours_ln: str, theirs: str, heads: int) -> list[Row]:
  """HF BertAttention (self.{query,key,value}, output.{dense,LayerNorm}) -> Attention + LN."""
  rows = []
  for proj in ("query", "key", "value"):
    rows += [(f"{ours}/{proj}/kernel", f"{theirs}.self.{proj}.weight", common.heads_in(heads)),
             (f"{ours}/{proj}/bias", f"{theirs}.self.{proj}.bias", common.heads_bias(heads))]
  rows += [(f"{ours}/out/kernel", f"{theirs}.output.dense.weight", common.heads_out(heads)),
           (f"{ours}/out/bias", f"{theirs}.output.dense.bias", common.SAME)]
  return rows + _ln(ours_ln, f"{theirs}.output.LayerNorm")


def _bert_layer(ours: str, theirs: str, heads: int, cross: bool) -> list[Row]:
  """HF BertLayer / M3AE's BertCrossLayer -> layers.PostLNBlock."""
  rows = _bert_attention(f"{ours}/attn", f"{ours}/attn_ln", f"{theirs}.attention", heads)
  if cross:
    rows += _bert_attention(f"{ours}/cross_attn", f"{ours}/cross_ln", f"{theirs}.crossattention",
                            heads)
  return (rows + _dense(f"{ours}/mlp/fc1", f"{theirs}.intermediate.dense") +
          _dense(f"{ours}/mlp/fc2", f"{theirs}.output.dense") +
          _ln(f"{ours}/mlp_ln", f"{theirs}.output.LayerNorm"))


def _clip_block(ours: str, theirs: str, heads: int) -> tuple[list[Row], Fused]:
  """CLIP ResidualAttentionBlock -> layers.PreLNBlock (q/k/v come fused, see `Fused`)."""
  rows = [(f"{ours}/attn/out/kernel", f"{theirs}.attn.out_proj.weight", common.heads_out(heads)),
          (f"{ours}/attn/out/bias", f"{theirs}.attn.out_proj.bias", common.SAME)]
  rows += _ln(f"{ours}/ln_1", f"{theirs}.ln_1") + _ln(f"{ours}/ln_2", f"{theirs}.ln_2")
  rows += _dense(f"{ours}/mlp/fc1", f"{theirs}.mlp.c_fc")
  rows += _dense(f"{ours}/mlp/fc2", f"{theirs}.mlp.c_proj")
  return rows, (f"{ours}/attn", f"{theirs}.attn", heads)


def _table(c: Any) -> dict[str, tuple[list[Row], list[Fused]]]:
  """Per part ('backbone' and each of HEADS): rows and fused q/k/v attentions, for model config
  `c`. The two position embeddings are handled apart (resized / computed)."""
  i, t, f, m = c.image, c.text, c.fusion, c.mim
  rows = [("image_encoder/patch_embed/kernel", VISUAL + "conv1.weight", common.CONV),
          ("image_encoder/class_embedding", VISUAL + "class_embedding", common.SAME)]
  rows += _ln("image_encoder/ln_pre", VISUAL + "ln_pre")
  rows += _ln("image_encoder/ln_post", VISUAL + "ln_post")
  fused = []
  for k in range(i.layers):
    block, qkv = _clip_block(f"image_encoder/block_{k}", f"{VISUAL}transformer.resblocks.{k}",
                             i.heads)
    rows += block
    fused.append(qkv)
  for ours, theirs in (("word_embeddings", "word_embeddings"),
                       ("position_embeddings", "position_embeddings"), ("token_type_embeddings",
                                                                        "token_type_embeddings")):
    rows.append((f"text_encoder/{ours}", f"{TEXT}embeddings.{theirs}.weight", common.SAME))
  rows += _ln("text_encoder/embeddings_ln", TEXT + "embeddings.LayerNorm")
  for k in range(t.layers):
    rows += _bert_layer(f"text_encoder/layer_{k}", f"{TEXT}encoder.layer.{k}", t.heads, False)
  rows += _dense("text_proj", "multi_modal_language_proj")
  rows += _dense("image_proj", "multi_modal_vision_proj")
  rows.append(("modality_type/embedding", "modality_type_embeddings.weight", common.SAME))
  for k in range(f.layers):
    rows += _bert_layer(f"fusion/text_layer_{k}", f"multi_modal_language_layers.{k}", f.heads, True)
    rows += _bert_layer(f"fusion/image_layer_{k}", f"multi_modal_vision_layers.{k}", f.heads, True)
  rows += _dense("text_pooler/dense", "multi_modal_language_pooler.dense")
  rows += _dense("image_pooler/dense", "multi_modal_vision_pooler.dense")
  parts = {"backbone": (rows, fused)}

  mlm = _dense("mlm_head/transform", "mlm_head.transform.dense")
  mlm += _ln("mlm_head/ln", "mlm_head.transform.LayerNorm")
  mlm += [("mlm_head/decoder/kernel", "mlm_head.decoder.weight", common.LINEAR),
          ("mlm_head/decoder/bias", "mlm_head.bias", common.SAME)]  # a separate Parameter
  parts["mlm_head"] = (mlm, [])

  mim = _dense("mim_decoder/embed", "mim_head.decoder_embed")
  mim.append(("mim_decoder/mask_token", "mim_head.mask_token", common.SAME))
  mim_fused = []
  for k in range(m.depth):
    block, qkv = _clip_block(f"mim_decoder/block_{k}", f"mim_head.decoder.resblocks.{k}", m.heads)
    mim += block
    mim_fused.append(qkv)
  mim += _ln("mim_decoder/ln", "mim_head.decoder_norm")
  mim += _dense("mim_decoder/pred", "mim_head.decoder_pred")
  parts["mim_head"] = (mim, mim_fused)

  parts["itm_head"] = (_dense("itm_head/fc", "itm_head.fc"), [])
  return parts


# --- what the checkpoint implies about the model config -------------------------------------------
def _count(state: dict[str, np.ndarray], prefix: str, source: str) -> int:
  """Number of layers `{prefix}{i}.` in the state dict (which must be 0..n-1)."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
  if found and found != set(range(max(found) + 1)):
    raise KeyError(f"{source}: layers {sorted(set(range(max(found) + 1)) - found)} of "
                   f"{prefix}* are missing")
  return len(found)


def _shape(state: dict[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
  if key not in state:
    raise KeyError(f"{source}: tensor {key!r} not found")
  return tuple(state[key].shape)


def model_fields(state: dict[str, np.ndarray], source: str = "checkpoint") -> dict[str, Any]:
  """The model config values ('image.width', 'fusion.layers', ...) that an M3AE state dict
  implies, from its tensor shapes and layer counts and from facts of M3AE's code.

  Raises when the state dict is not a CLIP-ViT + RoBERTa M3AE checkpoint.
  """
  if VISUAL + "conv1.weight" not in state:
    raise KeyError(f"{source}: tensor {VISUAL + 'conv1.weight'!r} not found: not an M3AE "
                   "checkpoint with a CLIP ViT (Swin-based M3AE checkpoints are not supported)")
  if VISUAL + "proj" in state:
    raise ValueError(f"{source}: has a visual projection {VISUAL + 'proj'!r}; M3AE's CLIP ViT "
                     "has none and the model cannot represent one")
  width, _, patch, patch_w = _shape(state, VISUAL + "conv1.weight", source)
  if patch != patch_w:
    raise ValueError(f"{source}: {VISUAL}conv1.weight has non-square patches {patch}x{patch_w}")
  vocab, text_width = _shape(state, TEXT + "embeddings.word_embeddings.weight", source)
  fields = {
      "image.width": width,
      "image.patch": patch,
      "image.layers": _count(state, VISUAL + "transformer.resblocks.", source),
      "image.heads": width // CLIP_HEAD_WIDTH,
      "image.mlp_dim": _shape(state, VISUAL + "transformer.resblocks.0.mlp.c_fc.weight", source)[0],
      "text.vocab_size": vocab,
      "text.width": text_width,
      "text.layers": _count(state, TEXT + "encoder.layer.", source),
      "text.mlp_dim": _shape(state, TEXT + "encoder.layer.0.intermediate.dense.weight", source)[0],
      "text.max_positions": _shape(state, TEXT + "embeddings.position_embeddings.weight", source)
                            [0],
      "text.type_vocab_size": _shape(state, TEXT + "embeddings.token_type_embeddings.weight",
                                     source)[0],
      "text.position_style": "roberta",
      "text.pad_id": 1,  # RoBERTa's <pad>; real tokens take positions 2, 3, ...
      "hidden": _shape(state, "multi_modal_language_proj.weight", source)[0],
      "fusion.layers": _count(state, "multi_modal_language_layers.", source),
      "fusion.mlp_dim": _shape(state, "multi_modal_language_layers.0.intermediate.dense.weight",
                               source)[0],
  }
  vision_layers = _count(state, "multi_modal_vision_layers.", source)
  if vision_layers != fields["fusion.layers"]:
    raise ValueError(f"{source}: {fields['fusion.layers']} multi_modal_language_layers but "
                     f"{vision_layers} multi_modal_vision_layers; the fusion needs as many of each")
  if "mim_head.decoder_embed.weight" in state:
    fields["mim.width"] = _shape(state, "mim_head.decoder_embed.weight", source)[0]
    fields["mim.depth"] = _count(state, "mim_head.decoder.resblocks.", source)
  return fields


_HINTS = {
    "image.layers": " (M3AE's CLIP Transformer builds layers - 1 of CLIP's blocks: 11 for "
                    "ViT-B/16)",
    "image.heads": " (M3AE's build_model uses width // 64 heads)",
    "text.position_style": " (M3AE's language encoder is RoBERTa; BERT-based M3AE checkpoints "
                           "are not supported)",
    "text.pad_id": " (RoBERTa's padding index, from which its position ids count)",
}


def check_config(state: dict[str, np.ndarray], model_config: Any, source: str = "checkpoint"):
  """Raises ValueError naming the model config field that differs from what the checkpoint
  implies (image.size may differ: the position embedding is resized)."""
  c = model_config
  ours = {"image.mlp_dim": int(c.image.width * c.image.mlp_ratio)}
  for field, value in model_fields(state, source).items():
    section, _, name = field.rpartition(".")
    have = ours[field] if field in ours else (c[section][name] if section else c[name])
    if have != value:
      shown = ("int(model.image.width * model.image.mlp_ratio)"
               if field == "image.mlp_dim" else f"model.{field}")
      raise ValueError(f"{source}: the checkpoint needs {shown} = {value!r}, but it is "
                       f"{have!r}{_HINTS.get(field, '')}")


def _notes(c: Any, imported_heads: set[str]) -> list[str]:
  """Differences between M3AE and the configured model that the weights cannot carry."""
  notes = []
  if c.text.eps != TEXT_EPS:
    notes.append(f"model.text.eps is {c.text.eps}; M3AE's RoBERTa encoder uses {TEXT_EPS}")
  if "mlm_head" in imported_heads and c.mlm.eps != BERT_EPS:
    notes.append(f"M3AE's MLM head LayerNorm uses eps {BERT_EPS}; ours uses model.mlm.eps = "
                 f"{c.mlm.eps}")
  mim_act, mim_eps = c.mim.activation, c.mim.eps
  if "mim_head" in imported_heads and (mim_act, mim_eps) != ("quick_gelu", CLIP_EPS):
    notes.append("M3AE's MIM decoder blocks are CLIP blocks (QuickGELU, LayerNorm eps "
                 f"{CLIP_EPS}, also in decoder_norm); ours use model.mim.activation = "
                 f"{mim_act!r} and model.mim.eps = {mim_eps}, so the imported decoder does not "
                 "compute M3AE's function exactly (set them to 'quick_gelu' and 1e-5)")
    if c.mim.layer != 3:
      notes.append(f"model.mim.layer is {c.mim.layer}; M3AE pre-trained its MIM decoder on the "
                   "image stream after 3 fusion layers (mim_layer=3), i.e. model.mim.layer=3")
  return notes


# --- import / export -----------------------------------------------------------------------------
def _check_shape(key: str, tensor: np.ndarray, want: tuple[int, ...], path: str, source: str):
  if tuple(tensor.shape) != tuple(want):
    raise ValueError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, but parameter "
                     f"{path!r} needs {tuple(want)} in M3AE's layout")


def _torch_shape(flat: dict[str, Any], path: str, layout: common.Layout) -> tuple[int, ...]:
  """The M3AE tensor shape that `layout` turns into params[path] (computed on a zero-stride
  view, so no array of that size is built)."""
  shape = tuple(np.shape(flat[path]))
  return tuple(np.shape(layout.to_torch(np.broadcast_to(np.float32(0), shape))))


def import_m3ae_state_dict(state: dict[str, np.ndarray], params: Any, model_config: Any,
                           source: str = "M3AE state dict",
                           require_heads: bool = False) -> tuple[Any, common.ImportReport]:
  """`import_m3ae` on an already loaded state dict (M3AE key -> float32 array)."""
  c = model_config
  check_config(state, c, source)
  present = {h for h in HEADS if any(k.startswith(h + ".") for k in state)}
  if require_heads and set(HEADS) - present:
    raise KeyError(f"{source}: no {sorted(set(HEADS) - present)} tensors (require_heads=True)")
  w = common.Writer(common.flatten(params), state, source)
  for part, (rows, fused) in _table(c).items():
    if part != "backbone" and part not in present:
      w.report.notes.append(f"the checkpoint has no {part}: {_SITE[part]}* keeps its fresh values")
      continue
    for ours, theirs, layout in rows:
      if ours not in w.flat:
        raise KeyError(f"parameter {ours!r} is not in the model (importing {theirs!r})")
      tensor = w.get(theirs)
      _check_shape(theirs, tensor, _torch_shape(w.flat, ours, layout), ours, source)
      w.put(ours, theirs, layout.to_jax)
    for ours, theirs, heads in fused:
      _put_fused(w, ours, theirs, heads, source)

  pos = w.get(POS)  # [1 + g*g, D]
  grid = c.image.size // c.image.patch
  if pos.ndim != 2 or pos.shape[1] != c.image.width:
    raise ValueError(f"{source}: tensor {POS!r} has shape {pos.shape}, expected "
                     f"(1 + grid * grid, {c.image.width})")
  if pos.shape[0] != 1 + grid * grid:
    old = int(round(np.sqrt(pos.shape[0] - 1)))
    pos = resize_pos_embed(pos, grid, c.image.pos_resize)  # [1 + grid*grid, D]
    w.report.notes.append(f"{POS}: {old}x{old} patch grid resized to {grid}x{grid} with "
                          f"{c.image.pos_resize} (CLS row kept)")
  w.put("image_encoder/position_embedding", POS, value=pos)

  if "mim_head" in present:
    _verify_decoder_pos(w, source)
  w.report.notes += _notes(c, present)
  return w.finish()


def _put_fused(w: common.Writer, ours: str, theirs: str, heads: int, source: str):
  """nn.MultiheadAttention in_proj_weight [3D, D] / in_proj_bias [3D] (rows q, k, v) -> query,
  key, value of layers.Attention."""
  kernels = [w.flat[f"{ours}/{p}/kernel"] for p in ("query", "key", "value")]
  d, h, dh = np.shape(kernels[0])
  for suffix, want, layout in (("weight", (3 * h * dh, d), common.heads_in(heads)),
                               ("bias", (3 * h * dh,), common.heads_bias(heads))):
    key = f"{theirs}.in_proj_{suffix}"
    tensor = w.get(key)
    _check_shape(key, tensor, want, f"{ours}/{{query,key,value}}", source)
    for part, proj in zip(np.split(tensor, 3, axis=0), ("query", "key", "value")):
      w.put(f"{ours}/{proj}/{'kernel' if suffix == 'weight' else 'bias'}", key, layout.to_jax,
            value=part)


def _verify_decoder_pos(w: common.Writer, source: str):
  """M3AE stores its fixed MIM-decoder positions; ours are computed, so they must agree."""
  if DECODER_POS not in w.state:
    raise KeyError(f"{source}: tensor {DECODER_POS!r} not found")
  stored = w.state[DECODER_POS]  # [1, 1 + g*g, W]; read, not imported: stays in skipped
  grid = int(round(np.sqrt(stored.shape[1] - 1))) if stored.ndim == 3 else -1
  if stored.ndim != 3 or stored.shape[0] != 1 or grid * grid != stored.shape[1] - 1:
    raise ValueError(f"{source}: tensor {DECODER_POS!r} has shape {stored.shape}, expected "
                     "(1, 1 + grid * grid, mim.width)")
  diff = float(np.max(np.abs(stored[0] - sincos_2d(grid, stored.shape[2]))))
  if diff > 1e-5:
    raise ValueError(f"{source}: tensor {DECODER_POS!r} differs from the MIM decoder's fixed 2-D "
                     f"sin-cos positions by up to {diff:.3g}; the model cannot represent them")
  w.report.notes.append(f"{DECODER_POS} ({grid}x{grid}) matches our computed sin-cos positions "
                        f"(max |diff| {diff:.2g}); not a parameter here, so skipped")


def import_m3ae(path: str, params: Any, model_config: Any,
                require_heads: bool = False) -> tuple[Any, common.ImportReport]:
  """Writes M3AE's Lightning checkpoint at `path` into the whole model's parameter tree.

  params: unboxed parameter tree; leaves not imported come back as they were (memory/*, gla/*,
  and any head the checkpoint lacks, all listed in report.initialised).
  model_config: the `model` config section; it must match the checkpoint (`check_config`), except
  image.size: the ViT position embedding is resized (image.pos_resize, CLS kept).
  require_heads: raise when the MLM, MIM or ITM head is missing (a fine-tuned checkpoint has
  none); by default a missing head stays fresh and is noted in report.notes.
  Returns (params, report); report.skipped lists every checkpoint tensor not used.
  """
  state = common.load_state_dict(path)
  return import_m3ae_state_dict(state, params, model_config, path, require_heads)


def export_m3ae_state_dict(params: Any, model_config: Any) -> dict[str, np.ndarray]:
  """The inverse of `import_m3ae`: M3AE state-dict names -> float32 arrays, for every parameter
  M3AE has, plus its fixed `mim_head.decoder_pos_embed`. M3AE loads it with strict=False (as it
  loads its own checkpoints); the CLIP text-tower leftovers and RoBERTa's pooler are absent."""
  c = model_config
  flat = common.flatten(params)

  def get(path):
    if path not in flat:
      raise KeyError(f"params has no {path!r}: expected the whole model's parameter tree")
    return np.asarray(flat[path], np.float32)

  out = {}
  for rows, fused in _table(c).values():
    for ours, theirs, layout in rows:
      out[theirs] = np.ascontiguousarray(layout.to_torch(get(ours)))
    for ours, theirs, heads in fused:
      out[f"{theirs}.in_proj_weight"] = np.concatenate([
          common.heads_in(heads).to_torch(get(f"{ours}/{p}/kernel"))
          for p in ("query", "key", "value")
      ], axis=0)  # [3D, D]
      out[f"{theirs}.in_proj_bias"] = np.concatenate([
          common.heads_bias(heads).to_torch(get(f"{ours}/{p}/bias"))
          for p in ("query", "key", "value")
      ], axis=0)  # [3D]
  out[POS] = get("image_encoder/position_embedding")
  grid = c.image.size // c.image.patch
  out[DECODER_POS] = sincos_2d(grid, c.mim.width)[None]  # [1, 1 + g*g, W]
  return out
