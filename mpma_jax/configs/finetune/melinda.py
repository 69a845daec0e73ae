"""MELINDA: multi-modal classification of the figure + caption into the 7 p_meth_label classes;
accuracy. Official train / dev / test."""
from mpma_jax.configs.finetune import common


def get_config():
  c = common.base("classification", "melinda")
  c.protocols = ("clean",)  # official splits and a fixed label set: the protocols coincide
  c.data.max_len = 128  # [M3AE]
  c.train.epochs = 20  # [M3AE]
  c.train.batch_size = 16  # [M3AE]
  c.optim.head_mult = 10.0  # [M3AE]
  return c
