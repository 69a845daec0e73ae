"""VQA-RAD (Lau et al. 2018), the MEVF/M3AE split: 3,064 train / 451 test questions."""
import json
import os

from mpma_jax.data.builders import base


class VqaRad(base.Builder):
  """VQA-RAD radiology visual question answering (train / test; no official validation split)."""
  TASK = "vqa"
  LAYOUT = """\
  trainset.json   JSON list: qid, image_name, image_organ, answer, answer_type, question, ...
  testset.json    same fields
  images/         synpic*.jpg"""

  def _split_paths(self, manual_dir):
    train, test, image_dir = self.require(manual_dir, "trainset.json", "testset.json", "images")
    return {
        "train": {"path": train, "image_dir": image_dir},
        "test": {"path": test, "image_dir": image_dir}
    }

  def _examples(self, split, path, image_dir):
    with open(path, encoding="utf-8") as f:
      records = json.load(f)
    cache = {}  # image bytes are shared by the questions about one image
    for r in records:
      name = r["image_name"]
      image = self.read_image(split, os.path.join(image_dir, name), cache)
      question = image and self.clean_text(split, r.get("question"), min_words=1)
      if not question:
        continue
      answer = str(r.get("answer", "")).strip()
      if not answer:
        self.skip(split, "empty answer")
        continue
      yield str(r["qid"]), {
          "id": str(r["qid"]), "image_id": name, "image": image, "question": question,
          "answer": answer, "answer_type": str(r.get("answer_type", "")).strip().lower(),
          "category": str(r.get("image_organ", "")).strip().lower()
      }
