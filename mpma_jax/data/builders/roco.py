"""ROCO (Pelka et al. 2018, radiology subset), ROCOv2 (Rückert et al. 2024), and the ROCO retrieval
benchmark (2,000 test pairs drawn with a fixed seed)."""
import codecs
import os

import numpy as np

from mpma_jax.data import text as texts
from mpma_jax.data.builders import base

ROCO_SPLITS = ("train", "validation", "test")  # directory names = TFDS split names
ROCOV2_SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # file prefix -> split


def roco_pairs(builder: base.Builder, split_dir: str, split: str):
  """(id, image bytes, caption) of one ROCO v1 split directory; bad ones skipped and counted."""
  with open(os.path.join(split_dir, "captions.txt"), "rb") as f:
    lines = f.read().removeprefix(codecs.BOM_UTF8).splitlines()  # bytes: split at CR / LF only
  image_dir = os.path.join(split_dir, "images")
  for line in lines:
    if not line.strip():
      continue
    roco_id, tab, caption = line.partition(b"\t")
    try:
      roco_id = texts.to_str(roco_id).strip()
    except texts.TextError as e:
      builder.skip(split, e.reason)
      continue
    if not tab or not roco_id:
      builder.skip(split, "malformed line")
      continue
    caption = builder.clean_text(split, caption)  # the space after the tab goes here
    if caption is None:
      continue
    image = builder.read_image(split, os.path.join(image_dir, f"{roco_id}.jpg"))
    if image is not None:
      yield roco_id, image, caption


class Roco(base.Builder):
  """ROCO v1 radiology image-caption pairs (train / validation / test)."""
  TASK = "pretrain"
  LAYOUT = """\
  data/{train,validation,test}/radiology/captions.txt   ROCO_00002<TAB> caption text
  data/{train,validation,test}/radiology/images/        ROCO_00002.jpg (missing ones are counted)
  (dlinks.txt, keywords.txt, semtypes.txt, cuis.txt, licences.txt are not needed)"""

  def _split_paths(self, manual_dir):
    dirs = self.require(manual_dir, *(f"data/{s}/radiology/captions.txt" for s in ROCO_SPLITS))
    self.require(manual_dir, *(f"data/{s}/radiology/images" for s in ROCO_SPLITS))
    return {s: {"split_dir": os.path.dirname(d)} for s, d in zip(ROCO_SPLITS, dirs)}

  def _examples(self, split, split_dir):
    for roco_id, image, caption in roco_pairs(self, split_dir, split):
      yield roco_id, {"id": roco_id, "image": image, "texts": [caption]}


class Rocov2(base.Builder):
  """ROCOv2 image-caption pairs (train / validation / test) from the CSV release."""
  TASK = "pretrain"
  LAYOUT = """\
  {train,valid,test}_captions.csv   columns ID,Caption
  {train,valid,test}/               ROCOv2_2023_train_000001.jpg, ..."""

  def _split_paths(self, manual_dir):
    out = {}
    for prefix, split in ROCOV2_SPLITS.items():
      csv_path, image_dir = self.require(manual_dir, f"{prefix}_captions.csv", prefix)
      out[split] = {"csv_path": csv_path, "image_dir": image_dir}
    return out

  def _examples(self, split, csv_path, image_dir):
    # The csv module reads the file itself, so a quoted line break (or U+2028, form feed, ...) stays
    # inside its caption; bytes that are not UTF-8 stay escaped and are counted per row.
    columns, rows = base.csv_rows(csv_path)
    if not {"ID", "Caption"} <= set(columns):
      raise ValueError(f"{csv_path}: expected columns ID,Caption; found {list(columns)}")
    for row in rows:
      if None in row or None in row.values():  # more or fewer fields than the header
        self.skip(split, "malformed line")
        continue
      try:
        image_id, caption = (texts.utf8(row[c]) for c in ("ID", "Caption"))
      except texts.TextError as e:
        self.skip(split, e.reason)
        continue
      image_id = image_id.strip()
      if not image_id:
        self.skip(split, "malformed line")
        continue
      caption = self.clean_text(split, caption)
      if caption is None:
        continue
      image = self.read_image(split, os.path.join(image_dir, f"{image_id}.jpg"))
      if image is not None:
        yield image_id, {"id": image_id, "image": image, "texts": [caption]}


class RocoRetrieval(base.Builder):
  """ROCO retrieval benchmark: NUM_PAIRS usable test pairs drawn with SEED (all if fewer)."""
  TASK = "retrieval"
  NUM_PAIRS = 2000
  SEED = 42
  LAYOUT = Roco.LAYOUT.replace("{train,validation,test}", "test")

  def _split_paths(self, manual_dir):
    (captions,) = self.require(manual_dir, "data/test/radiology/captions.txt")
    self.require(manual_dir, "data/test/radiology/images")
    return {"test": {"split_dir": os.path.dirname(captions)}}

  def _examples(self, split, split_dir):
    # Usable pairs in id order (image bytes dropped: the test split is ~8k images), then the draw.
    pairs = sorted((roco_id, caption) for roco_id, _, caption in roco_pairs(self, split_dir, split))
    rng = np.random.default_rng(self.SEED)
    chosen = rng.choice(len(pairs), size=min(self.NUM_PAIRS, len(pairs)), replace=False)
    for i in sorted(chosen):
      roco_id, caption = pairs[i]
      image = self.read_image(split, os.path.join(split_dir, "images", f"{roco_id}.jpg"))
      yield roco_id, {"id": roco_id, "image": image, "texts": [caption]}
