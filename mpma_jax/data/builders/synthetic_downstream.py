"""Built-in downstream sets from the synthetic cases (`data/synthetic.py`), so that fine-tuning and
evaluation run end to end without real data, through the same builder -> data source path.

  synthetic_vqa    Med-VQA: every image's `synthetic.questions` (open and closed)
  synthetic_cls    multi-modal classification like MELINDA: image + caption -> modality (4 classes);
                   the caption describes organ and lesions but never names the modality
  synthetic_chest  multi-label image classification like CheXpert: four findings visible in a chest
                   X-ray rendering of the case, text ""

Example i of a split is `synthetic.sample_case(seed, split, i)` rendered like the pre-training set
`synthetic` with the same seed (synthetic_chest redraws it as a chest X-ray).
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from mpma_jax.data import images, synthetic
from mpma_jax.data.builders import base

_NUMBER = ("no", "one", "two", "three")


@dataclasses.dataclass(eq=False)
class DownstreamConfig(tfds.core.BuilderConfig):
  """What a generated set depends on; the name encodes it so different sets never collide."""
  num_train: int = 1_000  # images in train
  num_eval: int = 200  # images in validation and in test
  image_size: int = 64  # rendered size (PNG)
  seed: int = 0


def config_for(num_train: int, num_eval: int, image_size: int, seed: int) -> DownstreamConfig:
  if num_train < 1 or num_eval < 1:
    raise ValueError(f"synthetic downstream sets need >= 1 image per split, got num_train="
                     f"{num_train}, num_eval={num_eval}")
  return DownstreamConfig(name=f"n{num_train}_e{num_eval}_s{image_size}_seed{seed}",
                          num_train=num_train, num_eval=num_eval, image_size=image_size, seed=seed)


class _Generated(base.Builder):
  """Shared by the three sets: no manual_dir; subclasses turn (split, index, case) into examples."""
  GENERATED = True
  BUILDER_CONFIGS = [config_for(1_000, 200, 64, 0)]
  LAYOUT = "  (none: the set is generated; --manual_dir is ignored)"

  def _examples(self, split, num):
    for i in range(num):
      yield from self._case_examples(split, i,
                                     synthetic.sample_case(self.builder_config.seed, split, i))

  def _png(self, case: synthetic.Case, index: int) -> bytes:
    cfg = self.builder_config
    return images.encode_png(
        synthetic.render_image(case, cfg.image_size, seed=cfg.seed, index=index))

  def _case_examples(self, split, index, case):
    raise NotImplementedError


class SyntheticVqa(_Generated):
  """Synthetic Med-VQA: ~12 open and closed questions per rendered image (train / validation / test)."""
  TASK = "vqa"

  def _case_examples(self, split, index, case):
    image_id = f"{split}-{index}"
    image = self._png(case, index)  # one encoding shared by all questions about the image
    for j, qa in enumerate(synthetic.questions(case)):
      key = f"{image_id}-{j}"
      yield key, {
          "id": key, "image_id": image_id, "image": image, "question": qa["question"],
          "answer": qa["answer"], "answer_type": qa["answer_type"].lower(),
          "category": qa["question_type"].lower()
      }


def caption(case: synthetic.Case) -> str:
  """Organ and lesions of the case in words, with nothing that gives away the modality (no
  modality name, no modality-specific term such as 'hyperdense')."""
  n = len(case.lesions)
  if n == 0:
    return f"image of the {case.organ}. no focal abnormality."
  lesions = [f"a {l.size} {l.intensity} lesion in the {l.region}" for l in case.lesions]
  body = lesions[0] if n == 1 else ", ".join(lesions[:-1]) + " and " + lesions[-1]
  return f"image of the {case.organ}. {_NUMBER[n]} {'lesion' if n == 1 else 'lesions'}: {body}."


class SyntheticCls(_Generated):
  """Synthetic multi-modal classification: image + caption -> imaging modality (4 classes)."""
  TASK = "classification"
  CLASS_NAMES = synthetic.MODALITIES

  def _case_examples(self, split, index, case):
    label = synthetic.MODALITIES.index(case.modality)
    key = f"{split}-{index}"
    yield key, {
        "id": key, "image": self._png(case, index), "text": caption(case), "label": label,
        "labels": np.eye(len(self.CLASS_NAMES), dtype=np.float32)[label]
    }


def chest_case(case: synthetic.Case) -> synthetic.Case:
  """The case drawn as a chest X-ray (its lesions kept), the image synthetic_chest stores."""
  return dataclasses.replace(case, modality="X-ray", organ="chest")


def chest_labels(case: synthetic.Case) -> np.ndarray:
  """float32 [4] over CHEST_CLASSES: any lesion, a large one, a bright one, two or more."""
  return np.array([
      len(case.lesions) > 0,
      any(l.size == "large" for l in case.lesions),
      any(l.intensity == "bright" for l in case.lesions),
      len(case.lesions) >= 2
  ], np.float32)


CHEST_CLASSES = ("lesion", "large lesion", "bright lesion", "multiple lesions")


class SyntheticChest(_Generated):
  """Synthetic multi-label chest X-rays: lesion / large / bright / multiple findings (no text)."""
  TASK = "classification"
  CLASS_NAMES = CHEST_CLASSES

  def _case_examples(self, split, index, case):
    key = f"{split}-{index}"
    yield key, {
        "id": key, "image": self._png(chest_case(case), index), "text": "", "label": -1,
        "labels": chest_labels(case)
    }


def _make(cls, data_dir, num_images, image_size, seed, num_eval):
  cfg = config_for(num_images, num_images if num_eval is None else num_eval, image_size, seed)
  known = {c.name for c in cls.BUILDER_CONFIGS}
  return cls(data_dir=data_dir, config=cfg.name if cfg.name in known else cfg)


def make_vqa(data_dir: str, num_images: int, image_size: int, seed: int = 0,
             num_eval: int = None) -> SyntheticVqa:
  """The synthetic_vqa builder with num_images images in train (and in validation and test unless
  num_eval is given); `download_and_prepare()` needs no manual_dir."""
  return _make(SyntheticVqa, data_dir, num_images, image_size, seed, num_eval)


def make_cls(data_dir: str, num_images: int, image_size: int, seed: int = 0,
             num_eval: int = None) -> SyntheticCls:
  """The synthetic_cls builder; arguments as make_vqa."""
  return _make(SyntheticCls, data_dir, num_images, image_size, seed, num_eval)


def make_chest(data_dir: str, num_images: int, image_size: int, seed: int = 0,
               num_eval: int = None) -> SyntheticChest:
  """The synthetic_chest builder; arguments as make_vqa."""
  return _make(SyntheticChest, data_dir, num_images, image_size, seed, num_eval)
