"""SLAKE (Liu et al. 2021), English questions: 4,919 train / 1,053 validation / 1,061 test."""
import json
import os

from mpma_jax.data.builders import base

SPLITS = {"train": "train", "validate": "validation", "test": "test"}  # file -> TFDS split


def answer_str(answer) -> str:
  """SLAKE answers may be JSON numbers: 3 -> '3', 2.5 -> '2.5' (never '3.0')."""
  if isinstance(answer, float) and answer.is_integer():
    return str(int(answer))
  return str(answer).strip()


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
    with open(path, encoding="utf-8") as f:
      records = json.load(f)
    cache = {}
    for r in records:
      if r.get("q_lang") != "en":
        self.skip(split, "not English")
        continue
      image = self.read_image(split, os.path.join(image_dir, r["img_name"]), cache)
      question = image and self.clean_text(split, r.get("question"), min_words=1)
      if not question:
        continue
      answer = answer_str(r.get("answer", ""))
      if not answer:
        self.skip(split, "empty answer")
        continue
      yield str(r["qid"]), {
          "id": str(r["qid"]), "image_id": r["img_name"], "image": image, "question": question,
          "answer": answer, "answer_type": str(r.get("answer_type", "")).strip().lower(),
          "category": str(r.get("content_type", "")).strip().lower()
      }
