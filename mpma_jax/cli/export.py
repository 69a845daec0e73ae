"""mpma-export: a pre-training run's checkpoint as PyTorch / Hugging Face directories (export.py).

  mpma-export --workdir RUN --out exported [--step 2000]

  OUT/image_encoder/  Hugging Face CLIPVisionModel directory (config.json + model.safetensors)
  OUT/text_encoder/   RobertaModel or BertModel directory, with the run's tokenizer files
  OUT/mpma/           the whole model, for mpma_jax.interop.torch_mpma.MPMATorch.from_pretrained

Prints one JSON line with the step and the three directories.
"""
import json

from absl import flags, logging

from mpma_jax import cli, export

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of mpma-pretrain")
_OUT = flags.DEFINE_string("out", None, "Output directory")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest)")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO
  print(json.dumps(export.export(_WORKDIR.value, _OUT.value, _STEP.value)))


def run():
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
