"""Hugging Face RoBERTa / BERT <-> the JAX text encoder (`text_encoder/*`) and MLM head
(`mlm_head/*`).

Both are the same post-LN encoder; they differ in how positions are counted (`position_style`),
in the pad id, the number of token types and the LayerNorm epsilon, which `text_config_from_hf`
reads from a checkpoint's config.json. Checkpoint keys are read with or without the
'roberta.' / 'bert.' prefix (a *ForMaskedLM has it, a bare RobertaModel / BertModel not); the MLM
head ('lm_head.*' or 'cls.predictions.*') is imported when present. The pooler has no counterpart
in the JAX encoder and is reported as skipped, so an exported RobertaModel / BertModel has no
pooler: load it with `from_pretrained(out_dir, add_pooling_layer=False)`.
"""
import json
import math
import os
import shutil
from typing import Any

import numpy as np
import transformers

from mpma_jax.interop import common

SCOPES = ("text_encoder/", "mlm_head/")
STYLES = {"roberta": "roberta", "bert": "bert"}  # HF model_type -> model.text.position_style
PREFIXES = {"roberta": "roberta.", "bert": "bert."}
# model.text field -> HF config field
FIELDS = {
    "vocab_size": "vocab_size", "width": "hidden_size", "layers": "num_hidden_layers",
    "heads": "num_attention_heads", "mlp_dim": "intermediate_size",
    "max_positions": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "pad_id": "pad_token_id", "position_style": "model_type", "eps": "layer_norm_eps"
}
# MLM head: JAX path under mlm_head/ -> its name in a RobertaForMaskedLM / BertForMaskedLM
HEAD = {
    "roberta": {
        "transform/kernel": "lm_head.dense.weight", "transform/bias": "lm_head.dense.bias",
        "ln/scale": "lm_head.layer_norm.weight", "ln/bias": "lm_head.layer_norm.bias",
        "decoder/bias": "lm_head.bias"
    }, "bert": {
        "transform/kernel": "cls.predictions.transform.dense.weight",
        "transform/bias": "cls.predictions.transform.dense.bias",
        "ln/scale": "cls.predictions.transform.LayerNorm.weight",
        "ln/bias": "cls.predictions.transform.LayerNorm.bias",
        "decoder/bias": "cls.predictions.bias"
    }
}
# The decoder's weight and bias are tied in HF (to the word embeddings and to the head's bias)
# and usually not stored; these names are read when they are.
DECODER = {
    "roberta": ("lm_head.decoder.weight", "lm_head.decoder.bias"),
    "bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
}


def _table(layers: int, heads: int) -> list[tuple[str, str, common.Layout]]:
  """(JAX path under text_encoder/, HF name without prefix, layout) for the encoder."""
  rows = [("word_embeddings", "embeddings.word_embeddings.weight", common.SAME),
          ("position_embeddings", "embeddings.position_embeddings.weight", common.SAME),
          ("token_type_embeddings", "embeddings.token_type_embeddings.weight", common.SAME),
          ("embeddings_ln/scale", "embeddings.LayerNorm.weight", common.SAME),
          ("embeddings_ln/bias", "embeddings.LayerNorm.bias", common.SAME)]
  for i in range(layers):
    ours, theirs = f"layer_{i}", f"encoder.layer.{i}"
    for proj in ("query", "key", "value"):
      rows += [(f"{ours}/attn/{proj}/kernel", f"{theirs}.attention.self.{proj}.weight",
                common.heads_in(heads)),
               (f"{ours}/attn/{proj}/bias", f"{theirs}.attention.self.{proj}.bias",
                common.heads_bias(heads))]
    rows += [(f"{ours}/attn/out/kernel", f"{theirs}.attention.output.dense.weight",
              common.heads_out(heads)),
             (f"{ours}/attn/out/bias", f"{theirs}.attention.output.dense.bias", common.SAME),
             (f"{ours}/attn_ln/scale", f"{theirs}.attention.output.LayerNorm.weight", common.SAME),
             (f"{ours}/attn_ln/bias", f"{theirs}.attention.output.LayerNorm.bias", common.SAME),
             (f"{ours}/mlp/fc1/kernel", f"{theirs}.intermediate.dense.weight", common.LINEAR),
             (f"{ours}/mlp/fc1/bias", f"{theirs}.intermediate.dense.bias", common.SAME),
             (f"{ours}/mlp/fc2/kernel", f"{theirs}.output.dense.weight", common.LINEAR),
             (f"{ours}/mlp/fc2/bias", f"{theirs}.output.dense.bias", common.SAME),
             (f"{ours}/mlp_ln/scale", f"{theirs}.output.LayerNorm.weight", common.SAME),
             (f"{ours}/mlp_ln/bias", f"{theirs}.output.LayerNorm.bias", common.SAME)]
  return rows


def _config_file(path: str) -> str | None:
  config_file = os.path.join(path, "config.json") if os.path.isdir(path) else None
  return config_file if config_file and os.path.exists(config_file) else None


def text_config_from_hf(path: str) -> dict[str, Any]:
  """The model.text field values that match the HF RoBERTa / BERT directory at `path`."""
  config_file = _config_file(path)
  if config_file is None:
    raise FileNotFoundError(f"{path} is not a directory holding a config.json")
  with open(config_file) as f:
    raw = json.load(f)
  model_type = raw.get("model_type")
  if model_type not in STYLES:
    raise ValueError(f"{config_file}: model_type is {model_type!r}, expected one of "
                     f"{sorted(STYLES)}")
  hf = transformers.AutoConfig.from_pretrained(path)  # fills the fields config.json leaves out
  position_type = raw.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise ValueError(f"{config_file}: position_embedding_type is {position_type!r}, the JAX text "
                     "encoder has 'absolute' position embeddings only")
  if hf.hidden_act != "gelu":
    raise ValueError(f"{config_file}: hidden_act is {hf.hidden_act!r}, the JAX text encoder uses "
                     "'gelu' (exact)")
  pad_id = hf.pad_token_id
  if pad_id is None:
    if model_type == "roberta":
      raise ValueError(f"{config_file}: pad_token_id is missing; RoBERTa positions depend on it")
    pad_id = 0  # BERT positions do not depend on it
  return {
      "vocab_size": hf.vocab_size, "width": hf.hidden_size, "layers": hf.num_hidden_layers,
      "heads": hf.num_attention_heads, "mlp_dim": hf.intermediate_size,
      "max_positions": hf.max_position_embeddings, "type_vocab_size": hf.type_vocab_size,
      "pad_id": int(pad_id), "position_style": STYLES[model_type], "eps": float(hf.layer_norm_eps)
  }


def check_config(path: str, text_config: Any):
  """Raises ValueError naming the field when the HF config at `path` differs from model.text."""
  if _config_file(path) is None:
    return
  for field, value in text_config_from_hf(path).items():
    ours = text_config[field]
    same = math.isclose(ours, value, rel_tol=1e-6) if field == "eps" else ours == value
    if not same:
      raise ValueError(f"{_config_file(path)}: {FIELDS[field]} is {value!r} but "
                       f"model.text.{field} is {ours!r}")


def _find_prefix(state: dict[str, np.ndarray], source: str) -> str:
  for prefix in (*PREFIXES.values(), ""):
    if prefix + "embeddings.word_embeddings.weight" in state:
      return prefix
  raise KeyError(f"{source}: no RoBERTa / BERT encoder found (expected a tensor "
                 "'embeddings.word_embeddings.weight', optionally prefixed with 'roberta.' or "
                 "'bert.')")


def _layer_norm_names(state: dict[str, np.ndarray]) -> dict[str, str]:
  """Old checkpoints call LayerNorm parameters gamma / beta: new name -> stored name."""
  aliases = {}
  for name in state:
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
      if "LayerNorm." in name and name.endswith(old):
        aliases[name[:-len(old)] + new] = name
  return aliases


def import_hf_text(path: str, params: Any, text_config: Any, mlm_head: bool = True,
                   mlm_eps: float | None = None) -> tuple[Any, common.ImportReport]:
  """Writes a HF RoBERTa / BERT (directory or weight file) into params['text_encoder'], and its
  MLM head, when the checkpoint has one and `mlm_head` (init.text_mlm_head), into
  params['mlm_head'].

  params: the model's (unboxed) parameter tree; other subtrees come back as they were.
  text_config: the `model.text` config section (see `text_config_from_hf`).
  mlm_eps: the MLM head's LayerNorm epsilon (model.mlm.eps); an imported head trained with
  another one (the checkpoint's layer_norm_eps = text_config.eps) gets a note.
  """
  check_config(path, text_config)
  state = common.load_state_dict(path)
  prefix = _find_prefix(state, path)
  aliases = _layer_norm_names(state)
  name = lambda n: aliases.get(n, n)
  layers = len(
      {k[len(prefix):].split(".")[2] for k in state if k.startswith(prefix + "encoder.layer.")})
  if layers != text_config.layers:
    raise ValueError(f"{path}: checkpoint has {layers} encoder layers but model.text.layers is "
                     f"{text_config.layers}")
  w = common.Writer(common.flatten(params), state, path)
  for ours, theirs, layout in _table(text_config.layers, text_config.heads):
    w.put("text_encoder/" + ours, name(prefix + theirs), layout.to_jax)

  family = next((f for f in HEAD if HEAD[f]["transform/kernel"] in state), None)
  if family is not None and not mlm_head:
    w.report.notes.append("init.text_mlm_head is False: the checkpoint's MLM head is not "
                          "imported, mlm_head/* keeps its fresh values")
  elif family is not None and "mlm_head/decoder/kernel" in w.flat:
    if mlm_eps is not None and not math.isclose(mlm_eps, text_config.eps, rel_tol=1e-6):
      w.report.notes.append(f"the imported MLM head was trained with LayerNorm eps "
                            f"{text_config.eps}; model.mlm.eps is {mlm_eps}")
    weight, bias = DECODER[family]
    for ours, theirs in HEAD[family].items():
      if ours == "decoder/bias" and bias in state:  # what HF's forward pass adds
        theirs = bias
      layout = common.LINEAR if ours == "transform/kernel" else common.SAME
      w.put("mlm_head/" + ours, name(theirs), layout.to_jax)
    if weight not in state:  # tied to the word embeddings
      weight = name(prefix + "embeddings.word_embeddings.weight")
    w.put("mlm_head/decoder/kernel", weight, common.LINEAR.to_jax)  # [V, D] -> [D, V]
  return w.finish(SCOPES)


def export_hf_text(params: Any, text_config: Any, out_dir: str, tokenizer_dir: str | None = None,
                   with_mlm_head: bool = False) -> str:
  """Writes params['text_encoder'] as a HF RobertaModel (position_style 'roberta') or BertModel
  ('bert') directory, without a pooler; with_mlm_head: as a RobertaForMaskedLM / BertForMaskedLM
  with params['mlm_head'] (decoder tied to the word embeddings when they are equal). Copies
  every file of `tokenizer_dir` along. Returns out_dir."""
  c = text_config
  style = c.position_style
  if style not in PREFIXES:
    raise ValueError(f"model.text.position_style must be one of {sorted(PREFIXES)}, got {style!r}")
  flat = common.flatten(params)
  if "text_encoder/word_embeddings" not in flat:
    raise KeyError("params has no text_encoder/word_embeddings: expected the whole model's "
                   "parameter tree with a text encoder")
  prefix = PREFIXES[style] if with_mlm_head else ""
  tensors = {
      prefix + theirs: layout.to_torch(np.asarray(flat["text_encoder/" + ours]))
      for ours, theirs, layout in _table(c.layers, c.heads)
  }
  tied = True
  if with_mlm_head:
    if "mlm_head/decoder/kernel" not in flat:
      raise KeyError("params has no mlm_head/decoder/kernel, needed for with_mlm_head=True")
    for ours, theirs in HEAD[style].items():
      layout = common.LINEAR if ours == "transform/kernel" else common.SAME
      tensors[theirs] = layout.to_torch(np.asarray(flat["mlm_head/" + ours]))
    decoder = common.LINEAR.to_torch(np.asarray(flat["mlm_head/decoder/kernel"]))  # [V, D]
    tied = np.array_equal(decoder, tensors[prefix + "embeddings.word_embeddings.weight"])
    if not tied:  # transformers then unties the decoder's bias from the head's bias as well
      weight, bias = DECODER[style]
      tensors[weight] = decoder
      tensors[bias] = tensors[HEAD[style]["decoder/bias"]]
  config_class = {"roberta": transformers.RobertaConfig, "bert": transformers.BertConfig}[style]
  model_name = {"roberta": "Roberta", "bert": "Bert"}[style]
  config = config_class(vocab_size=c.vocab_size, hidden_size=c.width, num_hidden_layers=c.layers,
                        num_attention_heads=c.heads, intermediate_size=c.mlp_dim,
                        max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab_size,
                        pad_token_id=c.pad_id, layer_norm_eps=c.eps, hidden_act="gelu",
                        hidden_dropout_prob=c.get("dropout", 0.1),
                        attention_probs_dropout_prob=c.get("attn_dropout",
                                                           0.1), tie_word_embeddings=tied,
                        architectures=[model_name + ("ForMaskedLM" if with_mlm_head else "Model")])
  os.makedirs(out_dir, exist_ok=True)
  config.save_pretrained(out_dir)
  common.save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))
  if tokenizer_dir:
    if not os.path.isdir(tokenizer_dir):
      raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} is not a directory")
    for entry in os.listdir(tokenizer_dir):
      if entry in ("config.json", "model.safetensors", "pytorch_model.bin"):
        continue  # a model directory given as tokenizer_dir: take its tokenizer only
      source = os.path.join(tokenizer_dir, entry)
      if os.path.isfile(source):
        shutil.copy(source, os.path.join(out_dir, entry))
  return out_dir
