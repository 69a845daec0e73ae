"""A pre-training run's checkpoint as PyTorch (mpma-export):

  DIR/image_encoder/  Hugging Face CLIPVisionModel directory (config.json + model.safetensors)
  DIR/text_encoder/   RobertaModel (model.text.position_style=roberta) or BertModel directory,
                      with the run's tokenizer files
  DIR/mpma/           the whole model (fusion, memory, GLA, heads) as model.safetensors +
                      config.json, loaded by mpma_jax.interop.torch_mpma.MPMATorch.from_pretrained

Every file written is safetensors or JSON. Runs on one CPU device whatever mesh trained the run.
"""
import os
from typing import Optional

from mpma_jax import checkpoint
from mpma_jax.interop import hf_clip, hf_text, torch_mpma
from mpma_jax.models import mpma


def export(workdir: str, out: str, step: Optional[int] = None) -> dict:
  """Writes the three directories; returns {'step', 'image_encoder', 'text_encoder', 'mpma'}."""
  config = checkpoint.run_config(workdir)
  params, step = checkpoint.restore_params(workdir, step)
  params = mpma.unrolled_params(params, config.model)  # the converters' layout (model.scan)
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  dirs = {name: os.path.join(out, name) for name in ("image_encoder", "text_encoder", "mpma")}
  hf_clip.export_clip_vision(params, config.model.image, dirs["image_encoder"])
  hf_text.export_hf_text(params, config.model.text, dirs["text_encoder"],
                         tokenizer_dir if os.path.isdir(tokenizer_dir) else None)
  torch_mpma.save_pretrained(params, config.model, dirs["mpma"])
  return {"step": step, **dirs}
