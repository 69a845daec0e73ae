"""`init.*` config fields: start pre-training (or fine-tuning) from public PyTorch weights.

  init.m3ae   an M3AE Lightning checkpoint (encoders, fusion, poolers, heads)  -> m3ae.py
  init.image  a Hugging Face CLIP vision tower                                 -> hf_clip.py
  init.text   a Hugging Face RoBERTa / BERT (+ MLM head: init.text_mlm_head)   -> hf_text.py

They are applied in that order to a freshly initialised model, so a later one overrides the part it
covers. Parameters no checkpoint covers (the MA-CMF memory, GLA) keep their fresh values.
"""
from typing import Any

import ml_collections

from mpma_jax.interop import common, hf_clip, hf_text, m3ae
from mpma_jax.interop.common import ImportReport
from mpma_jax.models import mpma

# CLIP vision config.json field -> model.image field
_CLIP_FIELDS = {
    "hidden_size": "width", "num_hidden_layers": "layers", "num_attention_heads": "heads",
    "patch_size": "patch"
}


def requested(config: ml_collections.ConfigDict) -> bool:
  return bool(config.init.m3ae or config.init.image or config.init.text)


def adapt_config(config: ml_collections.ConfigDict) -> list[str]:
  """With init.adapt_config, sets the model sizes from the checkpoints (an M3AE checkpoint's tensor
  shapes, the Hugging Face config.json files), and data.tokenizer from init.text when it is
  'builtin'. A model.image.layers below init.image's depth is kept (its first blocks are
  imported); a larger one is lowered to it. Returns the changes, for the log."""
  if not config.init.adapt_config:
    return []
  changes = []

  def put(section, field, value, source):
    if section[field] != value:
      changes.append(f"{field} {section[field]!r} -> {value!r} (from {source})")
      section[field] = value

  if config.init.m3ae:  # sizes implied by the checkpoint's tensors (it has no config.json)
    state = common.load_state_dict(config.init.m3ae)
    fields = m3ae.model_fields(state, config.init.m3ae)
    for dotted, value in fields.items():
      section, field = dotted.rsplit(".", 1) if "." in dotted else ("", dotted)
      target = config.model[section] if section else config.model
      if dotted == "image.mlp_dim":  # the ViT is sized by its MLP ratio
        field, value = "mlp_ratio", value / fields["image.width"]
      put(target, field, value, config.init.m3ae)
    if "mim.width" in fields:  # M3AE's MIM decoder is built from CLIP blocks
      put(config.model.mim, "activation", "quick_gelu", config.init.m3ae)
      put(config.model.mim, "eps", m3ae.CLIP_EPS, config.init.m3ae)
    if any(k.startswith("mlm_head.") for k in state):  # BERT's head: LayerNorm eps 1e-12
      put(config.model.mlm, "eps", m3ae.BERT_EPS, config.init.m3ae)
  if config.init.image:
    hf = hf_clip.hf_vision_config(config.init.image)
    if hf is not None:
      for key, field in _CLIP_FIELDS.items():
        if key == "num_hidden_layers" and config.model.image.layers < hf.num_hidden_layers:
          # A shallower ViT takes the checkpoint's first blocks (M3AE: 11 of CLIP's 12).
          changes.append(f"layers {config.model.image.layers} kept: the first "
                         f"{config.model.image.layers} of the {hf.num_hidden_layers} blocks of "
                         f"{config.init.image} are imported")
          continue
        put(config.model.image, field, getattr(hf, key), config.init.image)
      put(config.model.image, "mlp_ratio", hf.intermediate_size / hf.hidden_size, config.init.image)
  if config.init.text:
    for field, value in hf_text.text_config_from_hf(config.init.text).items():
      put(config.model.text, field, value, config.init.text)
    if config.init.text_mlm_head:  # an imported LM head computes what it was trained to
      put(config.model.mlm, "eps", config.model.text.eps, config.init.text)
    if config.data.tokenizer == "builtin":
      put(config.data, "tokenizer", config.init.text, "init.text")
  return changes


def initialise(config: ml_collections.ConfigDict, params: Any) -> tuple[Any, list[ImportReport]]:
  """params (the whole model's tree) with the `init.*` checkpoints written in, and one report per
  checkpoint. Leaves that no checkpoint covers are returned as they came (e.g. sharded arrays).
  The converters read and write the unrolled layout; with model.scan the stacks are taken apart
  for them and stacked again (models.mpma.scanned_params)."""
  scan = config.model.scan
  if scan:
    params = mpma.unrolled_params(params, config.model)
  reports = []
  if config.init.m3ae:
    params, report = m3ae.import_m3ae(config.init.m3ae, params, config.model)
    reports.append(report)
  if config.init.image:
    params, report = hf_clip.import_clip_vision(config.init.image, params, config.model.image)
    reports.append(report)
  if config.init.text:
    params, report = hf_text.import_hf_text(config.init.text, params, config.model.text,
                                            mlm_head=config.init.text_mlm_head,
                                            mlm_eps=config.model.mlm.eps)
    reports.append(report)
  if scan:
    params = mpma.scanned_params(params, config.model)
  return params, reports
