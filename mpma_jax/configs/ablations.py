"""The ablation study (docs/ablations.md): full MPMA, MPMA without each of its parts, and the M3AE
baseline, each pre-trained with every seed of SEEDS and fine-tuned on the downstream TASKS.

  python benchmarks/ablations.py --workdir runs/ablations [--variant tiny] [--steps N]
  mpma-sweep --config configs/ablations.py:tiny --workdir ROOT   # the pre-training runs alone

The study command lays its runs out as ROOT/<arm>/seed=<s> and runs the suite on them; mpma-sweep
names the same runs after their fields (mpma_jax/sweep.py) and runs no suite.
"""
import ml_collections

from mpma_jax.configs import pretrain
from mpma_jax.data.builders.synthetic_downstream import CHEST_CLASSES

SEEDS = (0, 1)  # pre-training seeds of every arm; each run's fine-tuning uses its run's seed
REFERENCE = "mpma"  # the arm every other arm is compared with

# Images per generated downstream set: train, and each of validation and test (about 13 questions
# per image in synthetic_vqa). Sized, with FINETUNE's epochs, so that the tiny study's 48
# fine-tuning runs take about an hour on a 2-core CPU, as long as its 12 pre-training runs.
SYNTHETIC = {"num_train": 200, "num_eval": 100}

# Downstream tasks: name -> (task config in configs/finetune, its variant, dataset, overrides of
# that task). A synthetic_* dataset is generated in the study's data_dir at the pre-training image
# size (SYNTHETIC); any other is used when `mpma-data build` has built it there, else left out.
TASKS = {
    "synthetic_vqa": ("vqa_rad", "", "synthetic_vqa", {}),
    # MELINDA's 128 caption tokens are more than tiny's text encoder reads (62); the generated
    # captions are the pre-training set's, which fit its 40.
    "synthetic_cls": ("melinda", "", "synthetic_cls", {"data.max_len": 40}),
    "synthetic_chest": ("chexpert", "probe_100", "synthetic_chest",
                        {"data.labels": CHEST_CLASSES, "data.test_split": "test"}),
    "vqa_rad": ("vqa_rad", "", "vqa_rad", {}),
}

# Fine-tuning overrides of every task (suite.apply_overrides): the clean protocol (train-only
# answer vocabulary, validation carved out of train, test read once), at the pre-training image
# size, with far fewer epochs than the paper's task configs so that a tiny study runs on a CPU.
FINETUNE = {"protocols": ("clean",), "image_size": 0, "train.epochs": 3}


def arms(variant: str = "tiny") -> dict[str, dict]:
  """Arm name -> its overrides of get_config(variant)."""
  m3ae = dict(pretrain.M3AE)
  if variant == "base":
    m3ae["model.image.layers"] = pretrain.M3AE_IMAGE_LAYERS
  return {
      REFERENCE: {},  # full MPMA
      "no_memory": {"model.memory.enabled": False},  # without MA-CMF
      "no_local": {"loss.local": 0.0},  # without GLA's local alignment
      "no_global": {"loss.global_": 0.0},  # without GLA's global alignment
      "unpaired": {"masking.paired": False},  # M3AE's two masked passes instead of paired masking
      "m3ae": m3ae,  # the M3AE baseline (configs/pretrain.py:m3ae at the variant's sizes)
  }


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """The pre-training config every arm starts from."""
  return pretrain.get_config(variant)


def get_sweep(variant: str = "tiny") -> list:
  """Every arm with every seed, for mpma-sweep: 6 arms x 2 seeds = 12 runs."""
  return [dict(overrides, seed=seed) for overrides in arms(variant).values() for seed in SEEDS]
