"""SLAKE (English questions): answer classification; open / closed / overall accuracy. Has an
official validation split, used for model selection by both protocols."""
from mpma_jax.configs.finetune import common


def get_config():
  c = common.base("vqa", "slake")
  c.train.epochs = 15  # [M3AE]
  c.train.batch_size = 32  # [M3AE]
  return c
