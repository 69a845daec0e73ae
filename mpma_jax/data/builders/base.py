"""What every dataset builder shares: the feature schema of each task, ArrayRecord output, checks
on the user's manual_dir, and skip counting.

Images are stored as the original encoded bytes in a scalar object tensor (TFDS's Image feature
needs TensorFlow to encode) and decoded by `data.images` when read. Each builder reads the files
exactly as distributed; anything unusable is skipped and counted per split and reason in
`builder.skipped`, which `mpma-data build` prints and saves next to the data (`build_report.json`).

Schemas (one per task, so the input pipeline and downstream code need not know the dataset):
  pretrain        id, image, texts [n]            one image, all its texts (caption, findings, ...)
  vqa             id, image_id, image, question, answer, answer_type ('open'|'closed'), category
  classification  id, image, text, label, labels [C]
                  (label: class index, or -1 for multi-label sets; labels: one-hot, or the raw
                   multi-label values 1 / 0 / -1 (uncertain) / NaN (not mentioned))
  retrieval       id, image, texts [n]
"""
import collections
import json
import os
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mpma_jax.data import images, text as texts

TASKS = ("pretrain", "vqa", "classification", "retrieval")
_IMAGE = tfds.features.Tensor(shape=(), dtype=np.object_)  # encoded bytes, decoded with Pillow


def features_for(task: str, num_classes: int = 0) -> tfds.features.FeaturesDict:
  """The TFDS feature schema of `task` (see module doc)."""
  if task in ("pretrain", "retrieval"):
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "image": _IMAGE,
        "texts": tfds.features.Sequence(tfds.features.Text())})
  if task == "vqa":
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "image_id": tfds.features.Text(), "image": _IMAGE,
        "question": tfds.features.Text(), "answer": tfds.features.Text(),
        "answer_type": tfds.features.Text(), "category": tfds.features.Text()})
  if task == "classification":
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "image": _IMAGE, "text": tfds.features.Text(),
        "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        "labels": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32)})
  raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


class ManualDirError(FileNotFoundError):
  """The user's manual_dir is missing a file the dataset's distribution has."""


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: subclasses set TASK, (CLASS_NAMES,) LAYOUT and implement `_examples`.

  `LAYOUT` is a short text shown in errors and in `mpma-data build --help`: the files expected in
  manual_dir. Subclasses implement `_split_paths(manual_dir)` (checks the layout, returns what
  `_examples` needs per split) and `_examples(split, ...)`, yielding (key, example) and calling
  `self.skip(split, reason)` for anything dropped.
  """
  VERSION = tfds.core.Version("1.0.0")
  TASK = "pretrain"
  CLASS_NAMES: Sequence[str] = ()
  LAYOUT = ""
  MIN_WORDS = texts.MIN_WORDS

  def __init_subclass__(cls, **kwargs):
    # Builders are looked up in `builders.BUILDERS`, not TFDS's global registry: no clash with
    # TFDS's own datasets of the same name, and test/benchmark builders may be defined twice.
    kwargs.setdefault("skip_registration", True)
    super().__init_subclass__(**kwargs)

  def __init__(self, *, data_dir: Optional[str] = None, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(data_dir=data_dir, **kwargs)
    self.skipped: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # noqa: N802 (TFDS's name)
    return self.LAYOUT or "(see the builder's docstring)"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=(self.__doc__ or "").strip(),
        features=features_for(self.TASK, len(self.CLASS_NAMES)),
        metadata=tfds.core.MetadataDict(task=self.TASK, class_names=list(self.CLASS_NAMES)))

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(manual_dir):
      raise ManualDirError(f"{self.name}: manual_dir {manual_dir!r} is not a directory. "
                           f"Expected layout:\n{self.LAYOUT}")
    return {split: self._checked(split, self._examples(split, **kw))
            for split, kw in self._split_paths(manual_dir).items()}

  def _checked(self, split: str, examples: Iterator) -> Iterator:
    """Passes examples through; a split left empty is an error that says what was skipped."""
    n = 0
    for n, example in enumerate(examples, 1):
      yield example
    if n == 0:
      raise ValueError(f"{self.name}: split {split!r} has no usable examples (skipped: "
                       f"{dict(self.skipped.get(split, {})) or 'nothing; the file lists none'})")

  def _generate_examples(self, **kwargs):  # TFDS requires it; splits are generated by _examples
    raise NotImplementedError

  # --- helpers for subclasses ---------------------------------------------------------------------
  def _split_paths(self, manual_dir: str) -> dict[str, dict]:
    raise NotImplementedError

  def _examples(self, split: str, **kwargs) -> Iterator[tuple[str, dict]]:
    raise NotImplementedError

  def require(self, manual_dir: str, *relpaths: str) -> list[str]:
    """Absolute paths of files/dirs that must exist in manual_dir; raises ManualDirError naming the
    first one missing (alternatives separated by '|' : the first that exists is returned)."""
    found = []
    for rel in relpaths:
      options = rel.split("|")
      hits = [os.path.join(manual_dir, o) for o in options
              if os.path.exists(os.path.join(manual_dir, o))]
      if not hits:
        raise ManualDirError(
            f"{self.name}: expected {' or '.join(repr(o) for o in options)} in manual_dir "
            f"{manual_dir!r} (not found). Expected layout:\n{self.LAYOUT}")
      found.append(hits[0])
    return found

  def skip(self, split: str, reason: str) -> None:
    self.skipped[split][reason] += 1

  def read_image(self, split: str, path: str, cache: Optional[dict] = None) -> Optional[bytes]:
    """The file's bytes, or None (skipped and counted) if it is missing, empty or undecodable.

    With `cache` (a dict the caller keeps), an image shared by several examples (VQA questions) is
    read and checked once; every example that uses a bad one is still counted.
    """
    if cache is not None and path in cache:
      data, reason = cache[path]
    else:
      data, reason = self._load_checked(path)
      if cache is not None:
        cache[path] = (data, reason)
    if reason:
      self.skip(split, reason)
    return data

  @staticmethod
  def _load_checked(path: str) -> tuple[Optional[bytes], Optional[str]]:
    if not os.path.exists(path):
      return None, "missing image"
    with open(path, "rb") as f:
      data = f.read()
    try:
      images.decode(data)
    except images.ImageError as e:
      return None, e.reason
    return data, None

  def clean_text(self, split: str, raw, min_words: Optional[int] = None) -> Optional[str]:
    """Cleaned text, or None (counted under its reason: empty, too short, non-UTF-8)."""
    try:
      return texts.clean(raw, self.MIN_WORDS if min_words is None else min_words)
    except texts.TextError as e:
      self.skip(split, e.reason)
      return None

  def clean_texts(self, split: str, raws: Iterable) -> list[str]:
    """The usable texts among `raws`; dropped ones are counted as '<reason> (one of several)'."""
    out = []
    for raw in raws:
      try:
        out.append(texts.clean(raw, self.MIN_WORDS))
      except texts.TextError as e:
        self.skipped[split][f"{e.reason} (one of several texts)"] += 1
    return out

  def report(self) -> dict:
    """Per split: examples written and skipped by reason (after download_and_prepare)."""
    out = {}
    for split, info in self.info.splits.items():
      out[split] = {"written": int(info.num_examples),
                    "skipped": dict(sorted(self.skipped.get(split, {}).items()))}
    return out


def write_report(builder: Builder, report: dict) -> str:
  """Saves the build report next to the ArrayRecord files; returns its path."""
  path = os.path.join(os.fspath(builder.data_dir), "build_report.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  return path


def read_report(builder: Builder) -> Optional[dict]:
  path = os.path.join(os.fspath(builder.data_dir), "build_report.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
