"""VQA-RAD: answer classification over the joint feature; open / closed / overall accuracy.
No validation split: the prior protocol selects on test (flagged), the clean one carves 10% of the
training images out as validation."""
from mpma_jax.configs.finetune import common


def get_config():
  c = common.base("vqa", "vqa_rad")
  c.train.epochs = 50  # [M3AE]
  c.train.batch_size = 64  # [M3AE]
  return c
