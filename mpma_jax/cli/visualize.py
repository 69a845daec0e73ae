"""mpma-visualize: pictures of a pre-training run's checkpoint (visualize.visualize_run): MIM
reconstructions, word-patch alignment heat maps, retrieval examples and the training curves.

  mpma-visualize --workdir RUN [--step 2000] [--out DIR] [--num 6]

Writes DIR/{mim,alignment,retrieval,curves}_step<N>.png and the same images to RUN/tb; prints one
JSON line with the paths.
"""
import json

from absl import flags, logging

from mpma_jax import cli, visualize

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of mpma-pretrain")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest)")
_OUT = flags.DEFINE_string("out", None, "Directory for the PNGs (default: <workdir>/pictures)")
_NUM = flags.DEFINE_integer("num", 6, "Examples per picture (rows)")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO
  paths = visualize.visualize_run(_WORKDIR.value, _STEP.value, _OUT.value, _NUM.value)
  print(json.dumps({"paths": paths}))


def run():
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
