"""The built-in synthetic set (`data/synthetic.py`) written as ArrayRecord like every real dataset,
so that pre-training always reads through the same builder -> data source -> pipeline path."""
import dataclasses

import tensorflow_datasets as tfds

from mpma_jax.data import images, synthetic
from mpma_jax.data.builders import base


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """What the generated set depends on; the name encodes it so different sets never collide."""
  num_train: int = 20_000  # training pairs
  num_eval: int = 1_000  # pairs in validation and in test
  image_size: int = 64  # rendered size (PNG)
  seed: int = 0


def config_for(num_train: int, num_eval: int, image_size: int, seed: int) -> SyntheticConfig:
  return SyntheticConfig(name=f"n{num_train}_e{num_eval}_s{image_size}_seed{seed}",
                         num_train=num_train, num_eval=num_eval, image_size=image_size, seed=seed)


class Synthetic(base.Builder):
  """Rendered radiology-like images with reports that describe them (no manual_dir needed)."""
  GENERATED = True
  TASK = "pretrain"
  BUILDER_CONFIGS = [config_for(20_000, 1_000, 64, 0)]
  LAYOUT = "  (none: the set is generated; --manual_dir is ignored)"

  def _examples(self, split, num):
    cfg = self.builder_config
    for i in range(num):
      case = synthetic.sample_case(cfg.seed, split, i)
      image = synthetic.render_image(case, cfg.image_size, seed=cfg.seed, index=i)
      yield i, {
          "id": f"{split}-{i}", "image": images.encode_png(image),
          "texts": [synthetic.report(cfg.seed, split, i)]
      }


def make(data_dir: str, num_train: int, num_eval: int, image_size: int, seed: int) -> Synthetic:
  """The builder of the set with these parameters (TFDS wants a predefined config by name)."""
  cfg = config_for(num_train, num_eval, image_size, seed)
  known = {c.name for c in Synthetic.BUILDER_CONFIGS}
  return Synthetic(data_dir=data_dir, config=cfg.name if cfg.name in known else cfg)
