"""Grain input pipeline for pre-training: ArrayRecord sources (built by `mpma-data build`) ->
per-source shuffle + repeat -> weighted mixture -> decode + tokenize + paired masking -> per-host
shard -> batch -> worker processes + prefetch.

`config.data.name` is one dataset or a weighted mixture: "roco", "roco:2,medicat:1" (weights are
relative). Everything after the mixture is a pure function of (seed, position in the global
stream), so an example's text choice and masks do not change with the number of workers or hosts,
and the iterator's state (saved with each checkpoint) resumes the exact same stream.

Bad input never stops a run: an image that fails to decode is replaced by the next decodable record
of the same source (`bad_image` = 1 marks the replacement), and a report longer than data.max_len
tokens is truncated (`truncated` = 1). Both are per-example counters the trainer sums and logs.

A batch is a dict of NumPy arrays (`BATCH_FIELDS`):

  image          uint8 [B, H, W, 3]   the image, resized + centre-cropped (normalised on device)
  text_ids       int32 [B, L]         the report's token ids (clean)
  text_mask      int32 [B, L]         1 for real tokens (incl. [CLS]/[SEP]), 0 for padding
  word_mask      int32 [B, L]         1 for real words only (no special tokens, no padding)
  mlm_ids        int32 [B, L]         text_ids after 80/10/10 replacement at the chosen positions
  mlm_labels     int32 [B, L]         original id at chosen positions, -100 elsewhere
  image_keep     int32 [B, n_keep]    visible patch indices (static count)
  image_restore  int32 [B, N]         inverse permutation: patch j is masked iff restore[j] >= n_keep
  index          int64 [B]            position in the global example stream
  source         int32 [B]            which mixture component the example came from
  bad_image      int32 [B]            1 if the drawn record's image was unusable and replaced
  truncated      int32 [B]            1 if the report was cut to data.max_len tokens
"""
import functools
import os
import time
from typing import Any, Optional

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mpma_jax import masking
from mpma_jax.data import builders, images
from mpma_jax.data import tokenizer as tokenizers
from mpma_jax.data.builders import synthetic as synthetic_builder

BATCH_FIELDS = ("image", "text_ids", "text_mask", "word_mask", "mlm_ids", "mlm_labels",
                "image_keep", "image_restore", "index", "source", "bad_image", "truncated")
COUNTER_FIELDS = ("source", "bad_image", "truncated")  # host-side bookkeeping, not model inputs
TEXT_CHOICES = ("random", "first", "concat")


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """'roco:2,medicat:1' -> [('roco', 2.0), ('medicat', 1.0)]; a bare name has weight 1."""
  out = []
  for part in spec.split(","):
    name, _, weight = part.strip().partition(":")
    try:
      w = float(weight) if weight else 1.0
    except ValueError:
      raise ValueError(
          f"data.name={spec!r}: weight {weight!r} of {name!r} is not a number") from None
    if not name or w <= 0:
      raise ValueError(f"data.name={spec!r}: expected 'name' or 'name:weight' with weight > 0")
    builders.get(name)  # unknown names fail here, listing the available ones
    out.append((name, w))
  return out


def _builder(config: ml_collections.ConfigDict, name: str, data_dir: str):
  if name == "synthetic":  # generated; its size and look follow the config
    return synthetic_builder.make(data_dir, config.data.num_train, config.data.num_eval,
                                  config.model.image.size, config.seed)
  return builders.builder(name, data_dir)


def _generate_synthetic(config, b, data_dir: str, timeout_s: float = 1800.0):
  """Process 0 writes the synthetic set; the other processes wait until it is there."""
  if jax.process_index() == 0:
    b.download_and_prepare(download_config=tfds.download.DownloadConfig())
    return b
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    time.sleep(2.0)
    b = _builder(config, "synthetic", data_dir)
    if b.is_prepared():
      return b
  raise TimeoutError(f"process {jax.process_index()}: the synthetic set did not appear in "
                     f"{data_dir!r} within {timeout_s:.0f}s (process 0 writes it)")


def data_dir_for(config, workdir: str) -> str:
  """config.data.data_dir, or <workdir>/data when only the generated synthetic set is used."""
  if config.data.data_dir:
    return config.data.data_dir
  if all(name == "synthetic" for name, _ in parse_mixture(config.data.name)):
    return os.path.join(workdir, "data")
  raise ValueError(f"data.name={config.data.name!r} needs --config.data.data_dir: the directory "
                   "given to `mpma-data build NAME --manual_dir ... --data_dir DIR`")


def prepare(config: ml_collections.ConfigDict, data_dir: str) -> list:
  """Checks data.name and data_dir before any training work; generates the synthetic set if it is
  used and missing. Returns the builders of the mixture, in order."""
  if not data_dir:
    raise ValueError("data.data_dir is empty: set --config.data.data_dir to the directory given "
                     "to `mpma-data build ... --data_dir`")
  out = []
  for name, _ in parse_mixture(config.data.name):
    b = _builder(config, name, data_dir)
    if name == "synthetic" and not b.is_prepared():
      b = _generate_synthetic(config, b, data_dir)
    if not b.is_prepared():
      raise FileNotFoundError(
          f"dataset {name!r} is not built in data_dir {data_dir!r} (no {b.data_dir}); run "
          f"`mpma-data build {name} --manual_dir <the dataset as distributed> --data_dir {data_dir}`"
      )
    if b.info.metadata.get("task") not in ("pretrain", "retrieval"):
      raise ValueError(f"dataset {name!r} is a {b.info.metadata.get('task')} dataset; pre-training "
                       "needs (image, text) pairs: roco, rocov2, medicat, mimic_cxr, synthetic")
    out.append(b)
  return out


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
  return tokenizers.load_tokenizer(path)


@functools.lru_cache(maxsize=4)
def _random_ids(tokenizer_dir: str) -> np.ndarray:
  """Token ids MLM may substitute: the whole vocabulary minus special tokens (once per process)."""
  tok = _load_tokenizer(tokenizer_dir)
  return np.setdiff1d(np.arange(len(tok), dtype=np.int32), tokenizers.special_ids(tok))


def encode_texts(tokenizer, texts, max_len: int) -> dict:
  """Tokenize -> text_ids, text_mask, word_mask [B, L] (int32)."""
  enc = tokenizers.encode(tokenizer, list(texts), max_len)
  ids, mask = enc["input_ids"], enc["attention_mask"]
  word = mask.astype(bool) & ~np.isin(ids, tokenizers.special_ids(tokenizer))
  return {"text_ids": ids, "text_mask": mask, "word_mask": word.astype(np.int32)}


def choose_text(texts: list, how: str, rng: np.random.Generator) -> str:
  """One training text from an image's texts (caption, references, findings, impression...)."""
  texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts]
  if not texts:
    return ""
  if how == "random":
    return texts[int(rng.integers(len(texts)))]
  if how == "first":
    return texts[0]
  if how == "concat":
    return " ".join(texts)
  raise ValueError(f"data.text_choice={how!r}; expected one of {TEXT_CHOICES}")


class Tag(grain.transforms.MapWithIndex):
  """Marks a record with its mixture component and record index (before shuffling)."""
  def __init__(self, source_id: int):
    self.source_id = source_id

  def map_with_index(self, index: int, record: dict) -> dict:
    return {"record": record, "source": self.source_id, "record_index": index}


class DecodeAndMask(grain.transforms.MapWithIndex):
  """Decodes the image, picks and tokenizes the text and draws the paired masks for one example.

  Picklable: the tokenizer is loaded lazily in each worker process from its directory; the data
  sources are ArrayRecord readers, which Grain re-opens in each worker.
  """
  MAX_PROBES = 16  # records tried after an unusable image before giving up

  def __init__(self, sources: list, tokenizer_dir: str, config: ml_collections.ConfigDict):
    self.sources = sources
    self.tokenizer_dir = tokenizer_dir
    self.seed = config.seed
    self.max_len = config.data.max_len
    self.text_choice = config.data.text_choice
    self.size = config.model.image.size
    self.num_patches = (config.model.image.size // config.model.image.patch)**2
    self.cfg = dict(config.masking)

  def _image(self, source: int, index: int, record: dict) -> tuple[np.ndarray, dict, int]:
    """The record's image, or the next usable record of the same source (and 1 for 'replaced')."""
    n = len(self.sources[source])
    for probe in range(self.MAX_PROBES + 1):
      if probe:
        record = self.sources[source][(index + probe) % n]
      try:
        return images.load(record["image"], self.size), record, int(probe > 0)
      except images.ImageError:
        continue
    raise RuntimeError(f"{self.MAX_PROBES + 1} consecutive unusable images in mixture component "
                       f"{source} from record {index}: the dataset needs rebuilding")

  def map_with_index(self, position: int, example: dict) -> dict:
    tok = _load_tokenizer(self.tokenizer_dir)
    image, record, replaced = self._image(example["source"], example["record_index"],
                                          example["record"])
    rng = np.random.default_rng([self.seed, position, 7])  # text choice; masks use their own
    report = choose_text(record["texts"], self.text_choice, rng)
    # One call with max_len + 1 tells whether the report was cut (the tokenizer's padding and
    # truncation settings are shared state: every call in this process must use the same ones).
    longer = {k: v[0] for k, v in encode_texts(tok, [report], self.max_len + 1).items()}
    truncated = int(longer["text_mask"][-1])
    text = {k: v[:self.max_len].copy() for k, v in longer.items()}
    if truncated:  # keep the closing special token ([SEP] / </s>) last, as truncation would
      text["text_ids"][-1] = longer["text_ids"][-1]
      text["word_mask"][-1] = 0
    random_ids = _random_ids(self.tokenizer_dir)
    masks = masking.paired_masks(self.seed, 0, position, num_patches=self.num_patches,
                                 image_mask_ratio=self.cfg["image_ratio"],
                                 input_ids=text["text_ids"],
                                 candidate_mask=text["word_mask"].astype(bool),
                                 text_mask_ratio=self.cfg["text_ratio"], mask_id=tok.mask_token_id,
                                 random_ids=random_ids, mask_prob=self.cfg["mask_prob"],
                                 random_prob=self.cfg["random_prob"])
    return {
        "image": image, **text, **masks, "index": np.int64(position),
        "source": np.int32(example["source"]), "bad_image": np.int32(replaced),
        "truncated": np.int32(truncated)
    }


def mixture(config: ml_collections.ConfigDict, data_dir: str, split: str = "train"):
  """(MapDataset of tagged records, infinite, weighted mix of shuffled, repeated sources;
  the list of data sources)."""
  parts = parse_mixture(config.data.name)
  sources, datasets = [], []
  for i, b in enumerate(prepare(config, data_dir)):
    source = b.as_data_source(split)
    sources.append(source)
    ds = grain.MapDataset.source(source).map_with_index(Tag(i))
    datasets.append(ds.shuffle(seed=config.seed + i).repeat())  # reshuffled every epoch
  if len(datasets) == 1:
    return datasets[0], sources
  return grain.MapDataset.mix(datasets, [w for _, w in parts]), sources


class HostShare(grain.MapDataset):
  """This host's rows of every global batch: global batch b holds stream positions
  [b*G, (b+1)*G), and host p of P reads the contiguous block [b*G + p*G/P, b*G + (p+1)*G/P).

  Contiguous blocks (not a stride) make the global batch that `make_array_from_process_local_data`
  assembles identical, row for row, to the single-host batch: the same run on any number of hosts
  sees the same batches in the same order.
  """
  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self.global_batch, self.local = global_batch, global_batch // process_count
    self.offset = process_index * self.local
    self._length = len(parent) // global_batch * self.local  # whole global batches only

  def __len__(self) -> int:
    return self._length

  def _position(self, index: int) -> int:
    batch, row = divmod(index, self.local)
    return batch * self.global_batch + self.offset + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._position(index)]

  def __str__(self) -> str:
    return f"HostShare(rows {self.offset}..{self.offset + self.local - 1} of {self.global_batch})"


def pretrain_dataset(config: ml_collections.ConfigDict, tokenizer_dir: str, data_dir: str,
                     process_index: Optional[int] = None, process_count: Optional[int] = None):
  """An infinite grain.IterDataset of this host's share of the global batches (see module doc).

  Its iterator supports get_state()/set_state() for exact resumption.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  global_batch = config.train.batch_size
  if global_batch % process_count:
    raise ValueError(f"train.batch_size={global_batch} is not divisible by the "
                     f"{process_count} processes")
  ds, sources = mixture(config, data_dir, "train")
  ds = ds.map_with_index(DecodeAndMask(sources, tokenizer_dir, config))
  ds = HostShare(ds, global_batch, process_index, process_count)  # each host reads its own rows
  ds = ds.batch(global_batch // process_count, drop_remainder=True)
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=config.data.read_threads,
                        prefetch_buffer_size=config.data.read_buffer))
  if config.data.workers > 0:
    ds = ds.mp_prefetch(
        grain.multiprocessing.MultiprocessingOptions(num_workers=config.data.workers,
                                                     per_worker_buffer_size=config.data.prefetch))
  return ds


def eval_pairs(config: ml_collections.ConfigDict, tokenizer, num_pairs: int, data_dir: str,
               split: str = "test") -> dict[str, Any]:
  """Held-out (image, text) pairs of the mixture's first dataset, for zero-shot retrieval:
  image [N, H, W, 3], text_ids/text_mask [N, L]. Pairs with unusable images are left out."""
  name, _ = parse_mixture(config.data.name)[0]
  b = prepare(config, data_dir)[0]
  source = b.as_data_source(split)
  pairs, texts = [], []
  for i in range(len(source)):
    if len(pairs) == num_pairs:
      break
    record = source[i]
    try:
      pairs.append(images.load(record["image"], config.model.image.size))
    except images.ImageError:
      continue
    texts.append(choose_text(record["texts"], "first", None))
  if len(pairs) < num_pairs:
    raise ValueError(f"eval.num_pairs={num_pairs} but the {split!r} split of {name!r} has only "
                     f"{len(pairs)} usable pairs; lower eval.num_pairs")
  return {"image": np.stack(pairs), **encode_texts(tokenizer, texts, config.data.max_len)}


def report_corpus(config: ml_collections.ConfigDict, data_dir: str, limit: int):
  """Training texts of the mixture (for the builtin tokenizer), up to `limit` of them."""
  n = 0
  for b in prepare(config, data_dir):
    source = b.as_data_source("train")
    for i in range(len(source)):
      for t in source[i]["texts"]:
        if n == limit:
          return
        yield t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
        n += 1


def dummy_batch(config, batch_size: int) -> dict:
  """Zeros with the pipeline's shapes and dtypes (for init and shape inference)."""
  size, patch, length = config.model.image.size, config.model.image.patch, config.data.max_len
  n = (size // patch)**2
  keep = masking.num_kept_patches(n, config.masking.image_ratio)
  i32 = lambda *s: np.zeros(s, np.int32)
  return {
      "image": np.zeros((batch_size, size, size, 3),
                        np.uint8), "text_ids": i32(batch_size, length), "text_mask": np.ones(
                            (batch_size, length), np.int32), "word_mask": i32(batch_size, length),
      "mlm_ids": i32(batch_size, length), "mlm_labels": np.full(
          (batch_size, length), -100,
          np.int32), "image_keep": np.tile(np.arange(keep, dtype=np.int32), (batch_size, 1)),
      "image_restore": np.tile(np.arange(n, dtype=np.int32), (batch_size, 1)), "index": np.zeros(
          (batch_size,), np.int64)
  }
