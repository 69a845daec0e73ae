"""`mpma-export --workdir RUN --out DIR [--step N]`: a pre-training run's checkpoint as PyTorch.

  DIR/image_encoder/  Hugging Face CLIPVisionModel directory (config.json + model.safetensors)
  DIR/text_encoder/   RobertaModel (model.text.position_style=roberta) or BertModel directory,
                      with the run's tokenizer files
  DIR/mpma/           the whole model (fusion, memory, GLA, heads) as model.safetensors +
                      config.json, loaded by mpma_jax.interop.torch_mpma.MPMATorch.from_pretrained

Every file written is safetensors or JSON. Runs on one CPU device whatever mesh trained the run.
"""
import json
import os
from typing import Any, Optional

from absl import app, flags, logging
import ml_collections



def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run was started with (<workdir>/config.json, written by mpma-pretrain)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} an mpma-pretrain run directory?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(workdir: str, step: Optional[int] = None) -> tuple[Any, int]:
  """(parameters as host numpy arrays, step) of a run's checkpoint, on whatever devices are here."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"),
                                  item_handlers={"state": ocp.StandardCheckpointHandler()})
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  step = manager.latest_step() if step is None else step
  if step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {directory}; there are {sorted(steps)}")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        manager.item_metadata(step)["state"])
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  manager.close()
  return jax.tree.map(np.asarray, restored["state"]["params"]), step


def export(workdir: str, out: str, step: Optional[int] = None) -> dict:
  """Writes the three directories; returns {'step', 'image_encoder', 'text_encoder', 'mpma'}."""
  from mpma_jax.interop import hf_clip, hf_text, torch_mpma  # pylint: disable=g-import-not-at-top
  config = run_config(workdir)
  params, step = restore_params(workdir, step)
  from mpma_jax.models import mpma  # pylint: disable=g-import-not-at-top
  params = mpma.unrolled_params(params, config.model)  # the converters' layout (model.scan)
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  dirs = {name: os.path.join(out, name) for name in ("image_encoder", "text_encoder", "mpma")}
  hf_clip.export_clip_vision(params, config.model.image, dirs["image_encoder"])
  hf_text.export_hf_text(params, config.model.text, dirs["text_encoder"],
                         tokenizer_dir if os.path.isdir(tokenizer_dir) else None)
  torch_mpma.save_pretrained(params, config.model, dirs["mpma"])
  return {"step": step, **dirs}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO
  result = export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step)
  print(json.dumps(result))


def run():
  # Flags are defined here, not at import, so that the functions above can be imported next to
  # mpma_jax.main (which defines --workdir too).
  flags.DEFINE_string("workdir", None, "Run directory of mpma-pretrain.", required=True)
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  app.run(main)


if __name__ == "__main__":
  run()
