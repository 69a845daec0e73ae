"""SLAKE (Liu et al. 2021), English questions: 4,919 train / 1,053 validation / 1,061 test in the
release, of which one training question has an empty answer (skipped: 4,918 train)."""
from mpma_jax.data.builders import base, vqa_rad

SPLITS = {"train": "train", "validate": "validation", "test": "test"}  # file -> TFDS split
# Example field -> the JSON key it is read from (read as in VQA-RAD: vqa_rad.question).
KEYS = {**vqa_rad.KEYS, "image_id": "img_name", "category": "content_type"}


class Slake(base.Builder):
  """SLAKE radiology VQA, English questions only (train / validation / test)."""
  TASK = "vqa"
  LAYOUT = """\
  train.json, validate.json, test.json   JSON list: img_id, img_name, question, answer, q_lang,
                                         answer_type (OPEN|CLOSED), content_type, qid, ...
  imgs/xmlab102/source.jpg               images at imgs/{img_name}"""

  def _split_paths(self, manual_dir):
    (image_dir,) = self.require(manual_dir, "imgs")
    return {
        split: {"path": self.require(manual_dir, f"{name}.json")[0], "image_dir": image_dir}
        for name, split in SPLITS.items()
    }

  def _examples(self, split, path, image_dir):
    cache = {}
    for r in vqa_rad.json_list(path):
      if isinstance(r, dict) and "q_lang" not in r:
        self.skip(split, "missing field")
        continue
      if isinstance(r, dict) and r["q_lang"] != "en":
        self.skip(split, "not English")
        continue
      ex = vqa_rad.question(self, split, r, image_dir, KEYS, cache)
      if ex is not None:
        yield ex["id"], ex
