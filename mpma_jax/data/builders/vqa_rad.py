"""VQA-RAD (Lau et al. 2018), the MEVF/M3AE split: 3,064 train / 451 test questions.

Also the reading shared with SLAKE, whose files are JSON lists of question records too."""
import json
import os
from typing import Optional

from mpma_jax.data import text as texts
from mpma_jax.data.builders import base

# Example field -> the JSON key it is read from. id, image_id, question and answer are required.
KEYS = {
    "id": "qid", "image_id": "image_name", "question": "question", "answer": "answer",
    "answer_type": "answer_type", "category": "image_organ"
}
REQUIRED = ("id", "image_id", "question", "answer")


def json_list(path: str) -> list:
  """The top-level list of a JSON file; ValueError naming the file if it is not one. Strings with
  bytes that are not UTF-8 are kept (escaped) for `question` to count."""
  with open(path, "rb") as f:
    content = f.read().decode("utf-8-sig", "surrogateescape")
  try:
    records = json.loads(content)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON list of questions, found {type(records).__name__}")
  return records


def field_str(value) -> str:
  """A JSON scalar as text: null -> '', 3 and 3.0 -> '3', 2.5 -> '2.5', strings stripped.
  TypeError for lists, objects and booleans."""
  if value is None:
    return ""
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  if isinstance(value, str):
    return texts.utf8(value).strip()
  raise TypeError(type(value).__name__)


def question(builder: base.Builder, split: str, record, image_dir: str, keys: dict,
             cache: dict) -> Optional[dict]:
  """The vqa example of one JSON record (`keys`: example field -> JSON key), or None (skipped and
  counted: malformed record, missing field, non-UTF-8 text, no image name, the image and question
  reasons, empty answer)."""
  if not isinstance(record, dict):
    builder.skip(split, "malformed record")
    return None
  if any(keys[f] not in record for f in REQUIRED):
    builder.skip(split, "missing field")
    return None
  try:
    ex = {f: field_str(record.get(k)) for f, k in keys.items()}
  except TypeError:
    builder.skip(split, "malformed record")
    return None
  except texts.TextError as e:
    builder.skip(split, e.reason)
    return None
  if not ex["id"]:
    builder.skip(split, "missing field")
    return None
  if not ex["image_id"]:
    builder.skip(split, "no image name")
    return None
  path = os.path.join(image_dir, ex["image_id"])
  if os.path.isdir(path):  # e.g. 'xmlab1/': a folder, not an image file
    builder.skip(split, "missing image")
    return None
  ex["image"] = builder.read_image(split, path, cache)
  if ex["image"] is None:
    return None
  ex["question"] = builder.clean_text(split, ex["question"], min_words=1)
  if ex["question"] is None:
    return None
  if not ex["answer"]:  # kept as written (stripped); normalised when the vocabulary is built
    builder.skip(split, "empty answer")
    return None
  ex["answer_type"], ex["category"] = ex["answer_type"].lower(), ex["category"].lower()
  return ex


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
    cache = {}  # image bytes are shared by the questions about one image
    for r in json_list(path):
      ex = question(self, split, r, image_dir, KEYS, cache)
      if ex is not None:
        yield ex["id"], ex
