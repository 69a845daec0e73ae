"""CheXpert-v1.0-small: image-only multi-label classification of the 5 competition labels from the
image encoder; mean AUC on the official validation set (used as test). Variants:
  chexpert.py            full fine-tune, 100% of the training labels
  chexpert.py:probe_1    linear probe, 1% of the labels (probe_10, probe_100, finetune_1, ...)
"""
from mpma_jax.configs.finetune import common

COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def get_config(variant: str = "finetune_100"):
  c = common.base("image_classification", "chexpert")
  c.protocols = ("clean",)  # no vocabulary; selection on a carved validation split
  c.image_size = 224  # [choice] the usual CheXpert resolution in prior uni-modal work
  c.data.test_split = "validation"  # the official valid.csv (234 studies, expert labels)
  c.data.labels = COMPETITION
  c.data.uncertain = "ones"  # U-Ones, the CheXpert paper's best single policy for these labels
  c.train.epochs = 5
  c.train.batch_size = 64
  c.optim.lr = 1e-5
  c.optim.head_mult = 10.0
  _variant(c, variant)
  return c


def _variant(c, variant: str):
  mode, _, pct = variant.partition("_")
  if mode not in ("finetune", "probe") or pct not in ("1", "10", "100"):
    raise ValueError(f"variant {variant!r}: expected finetune_|probe_ + 1 | 10 | 100")
  c.linear_probe = mode == "probe"
  c.data.label_fraction = int(pct) / 100
  if c.linear_probe:
    c.optim.lr = 1e-4  # only the head trains (head_mult still applies)
