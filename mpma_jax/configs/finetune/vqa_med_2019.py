"""VQA-Med-2019, categories C1-C3 (modality, plane, organ): answer classification; every question
is scored as open (a prediction is right if it is one of the '#'-separated accepted answers)."""
from mpma_jax.configs.finetune import common


def get_config():
  c = common.base("vqa", "vqa_med_2019")
  c.train.epochs = 10  # [M3AE]
  c.train.batch_size = 32  # [M3AE]
  return c
