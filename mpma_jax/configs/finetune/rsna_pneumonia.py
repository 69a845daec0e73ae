"""RSNA Pneumonia: image-only binary classification (pneumonia vs normal) from the image encoder;
AUC on the builder's seeded patient-level test split. Variants as in chexpert.py:
finetune_1 / finetune_10 / finetune_100 / probe_1 / probe_10 / probe_100."""
from mpma_jax.configs.finetune import chexpert, common


def get_config(variant: str = "finetune_100"):
  c = common.base("image_classification", "rsna_pneumonia")
  c.protocols = ("clean",)  # official-style seeded splits with validation: protocols coincide
  c.image_size = 224  # [choice] as for CheXpert
  c.data.labels = ("pneumonia",)
  c.train.epochs = 5
  c.train.batch_size = 64
  c.optim.lr = 1e-5
  c.optim.head_mult = 10.0
  chexpert._variant(c, variant)
  return c
