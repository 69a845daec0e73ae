"""Downstream data: which records train, select and test a fine-tuned model (the two protocols of
docs/method.md §6), the answer vocabulary, and the Grain pipelines that decode them into batches.

Protocols (`plan`):
  prior  what prior work (M3AE and before) reports: the VQA answer vocabulary comes from every
         split (it peeks at test answers), and a dataset without a validation split (VQA-RAD,
         CheXpert) selects its model on the test split. Results say so (`Plan.notes`).
  clean  the vocabulary comes from the training records only (a test answer outside it is counted
         wrong); without an official validation split, one is carved out of train with a fixed seed
         (whole images, so no image is on both sides); the test split is read once, at the end.
`label_fraction` (1%, 10%, 100% of the training labels) draws a seeded subset of what trains.

A decoded example (`Decode`), batched by `train_dataset` / `eval_batches`:
  image        uint8 [S, S, 3]    resized + centre-cropped
  text_ids     int32 [L]          question (VQA), caption (classification) or report (retrieval)
  text_mask    int32 [L]
  valid        int32 []           0 for an unusable image or a padding row (never scored)
  index        int64 []           record index in its split
  vqa:            accepted float32 [A] (1 for every accepted answer in the vocabulary; all 0 when
                  none is), closed int32 []
  classification: label int32 [] (class index, -1 for multi-label sets)
  image_classification: targets float32 [C], target_mask float32 [C] (0 = not scored / trained)
"""
import collections
import dataclasses
from typing import Optional, Sequence

import grain
import ml_collections
import numpy as np

from mpma_jax import tasks
from mpma_jax.data import builders, images, pipeline
from mpma_jax.data import text as texts

PROTOCOLS = ("prior", "clean")


def open_builder(name: str, data_dir: str):
  """The built dataset `name` under data_dir; FileNotFoundError with the build command if not."""
  b = builders.builder(name, data_dir)
  if not b.is_prepared():
    raise FileNotFoundError(f"dataset {name!r} is not built in {data_dir!r}; run `mpma-data build "
                            f"{name} --manual_dir DIR --data_dir {data_dir}`")
  return b


def answer_vocab(builder, splits: Sequence[str], indices: Optional[dict] = None) -> list[str]:
  """Sorted distinct normalised answers of the given splits (optionally only `indices[split]`).
  Every alternative of a '#'-separated answer is a class."""
  answers = set()
  for split in splits:
    source = builder.as_data_source(split)
    for i in (range(len(source)) if indices is None or split not in indices else indices[split]):
      answers.update(texts.accepted_answers(source[int(i)]["answer"]))
  return sorted(answers)


@dataclasses.dataclass
class Plan:
  """Record indices per role, as (split, indices); the VQA vocabulary; notes for the results;
  the dataset each role reads (retrieval trains on ROCO's pairs and tests on the seeded draw)."""
  protocol: str
  train: tuple[str, np.ndarray]
  select: tuple[str, np.ndarray]
  test: tuple[str, np.ndarray]
  vocab: list[str]
  notes: list[str]
  datasets: dict = dataclasses.field(default_factory=dict)  # role -> dataset name

  @property
  def selected_on_test(self) -> bool:
    return self.select[0] == self.test[0]


def _carve(builder, split: str, task: str, fraction: float, seed: int):
  """(train indices, validation indices) of `split`: a seeded `fraction` of its images (VQA
  questions grouped by image_id: tasks.Task.image_group) held out."""
  source = builder.as_data_source(split)
  n = len(source)
  group = tasks.get(task).image_group
  if group:
    groups = [texts.record_str(source[i][group]) for i in range(n)]
  else:
    groups = list(range(n))
  keys = sorted(set(groups), key=str)
  order = np.random.default_rng(seed).permutation(len(keys))
  n_val = max(1, int(round(fraction * len(keys))))
  if n_val >= len(keys):
    raise ValueError(f"val_fraction={fraction} leaves no training images in {builder.name}/{split} "
                     f"({len(keys)} images)")
  held = {keys[j] for j in order[:n_val]}
  val = np.array([i for i in range(n) if groups[i] in held], np.int64)
  train = np.array([i for i in range(n) if groups[i] not in held], np.int64)
  return train, val


def label_subset(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """A seeded `fraction` of `indices` (at least one), in increasing order; all for 1.0."""
  if not 0 < fraction <= 1:
    raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
  if fraction == 1:
    return indices
  n = max(1, int(round(fraction * len(indices))))
  return np.sort(np.random.default_rng(seed + 1).choice(indices, n, replace=False))


def plan(builder, config: ml_collections.ConfigDict, protocol: str) -> Plan:
  """Which records train, select and test under `protocol` (module doc). config: a fine-tuning
  config (its `task`, `data.test_split`, `data.val_fraction`, `data.label_fraction`, `seed`)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  if tasks.get(config.task).other_train_dataset:
    return _retrieval_plan(builder, config, protocol)
  splits = list(builder.info.splits)
  d = config.data
  test = d.test_split or ("test" if "test" in splits else "validation")
  if test not in splits or "train" not in splits:
    raise ValueError(f"{builder.name} has splits {splits}; data.test_split={test!r} and 'train' "
                     "must be among them")
  everything = lambda s: np.arange(len(builder.as_data_source(s)), dtype=np.int64)
  has_val = "validation" in splits and test != "validation"
  notes = []
  train = everything("train")
  if has_val:
    select = ("validation", everything("validation"))
  elif protocol == "prior":
    select = (test, everything(test))
    notes.append(f"model selected on the {test!r} split ({builder.name} has no validation split; "
                 "prior protocol, as in M3AE-style work): test figures are optimistic")
  else:
    train, val = _carve(builder, "train", config.task, d.val_fraction, config.seed)
    select = ("train", val)
    notes.append(f"validation = {len(val)} records ({d.val_fraction:.0%} of the training images, "
                 f"seed {config.seed}) carved out of train")
  train = label_subset(train, d.label_fraction, config.seed)
  if d.label_fraction < 1:
    notes.append(f"trained on {len(train)} records = {d.label_fraction:.0%} of the training labels")
  vocab = []
  if tasks.get(config.task).answers:
    if protocol == "prior":
      vocab = answer_vocab(builder, splits)
      notes.append("answer vocabulary from every split, test included (prior protocol)")
    else:
      vocab = answer_vocab(builder, ["train"], {"train": train})
  return Plan(protocol, ("train", train), select, (test, everything(test)), vocab, notes,
              dict.fromkeys(("train", "select", "test"), config.dataset))


def _retrieval_plan(builder, config, protocol: str) -> Plan:
  """Test: every pair of the retrieval set (roco_retrieval: the seeded 2,000). With training
  epochs: train on data.train_dataset's train split, select on the first data.num_select pairs
  of its validation split."""
  test = ("test", np.arange(len(builder.as_data_source("test")), dtype=np.int64))
  empty = ("train", np.zeros((0,), np.int64))
  datasets = {
      "train": config.data.train_dataset, "select": config.data.train_dataset,
      "test": config.dataset
  }
  if not config.train.epochs:
    return Plan(protocol, empty, empty, test, [], ["zero-shot: the pre-trained model, no training"],
                dict.fromkeys(datasets, config.dataset))
  pairs = open_builder(config.data.train_dataset, config.data_dir)
  train = np.arange(len(pairs.as_data_source("train")), dtype=np.int64)
  train = label_subset(train, config.data.label_fraction, config.seed)
  n_select = min(config.data.num_select, len(pairs.as_data_source("validation")))
  return Plan(protocol, ("train", train), ("validation", np.arange(n_select, dtype=np.int64)), test,
              [], [], datasets)


# --- decoding and batching ------------------------------------------------------------------------
class Subset:
  """Random-access view of `indices` of a data source; items carry their record index."""
  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    index = int(self.indices[i])
    return {"record": self.source[index], "index": index}


class Decode(grain.transforms.Map):
  """A record of a downstream task -> the example described in the module doc. Picklable (the
  tokenizer is loaded lazily in each worker)."""
  def __init__(self, task: str, tokenizer_dir: str, size: int, max_len: int,
               vocab: Sequence[str] = (), class_names: Sequence[str] = (),
               labels: Sequence[str] = (), uncertain: str = "ones", blank: str = "zeros",
               cache_images: int = 2048):
    self.task, self.tokenizer_dir, self.size, self.max_len = task, tokenizer_dir, size, max_len
    row = tasks.get(task)  # (its fields only: the row's functions do not pickle for workers)
    self.text_field, self.image_group = row.text_field, row.image_group
    self.vocab = {a: i for i, a in enumerate(vocab)}
    self.columns = [list(class_names).index(n) for n in labels]  # image_classification targets
    self.uncertain, self.blank = uncertain, blank
    # VQA questions share images (VQA-RAD: 3,515 questions on 315 images): decoded + resized images
    # are kept by image_id, the most recently used `cache_images` of them (0 = no cache).
    self.cache_images = cache_images if self.image_group else 0
    self._cache: collections.OrderedDict = collections.OrderedDict()

  def __getstate__(self):  # worker processes start with an empty cache
    return {**self.__dict__, "_cache": collections.OrderedDict()}

  def _image(self, record: dict) -> tuple[np.ndarray, int]:
    key = record.get(self.image_group) if self.cache_images else None
    if key is not None:
      try:  # (Grain's reader threads share the cache: an entry may go between two calls)
        self._cache.move_to_end(key)
        return self._cache[key]
      except KeyError:
        pass
    try:
      out = images.load(record["image"], self.size), 1
    except images.ImageError:
      out = np.zeros((self.size, self.size, 3), np.uint8), 0
    if key is not None:
      self._cache[key] = out
      while len(self._cache) > self.cache_images:
        try:
          self._cache.popitem(last=False)
        except KeyError:
          break
    return out

  def map(self, item: dict) -> dict:
    record = item["record"]
    image, valid = self._image(record)
    image = image.copy()  # batches must not alias the cached array
    text = record[self.text_field]
    if self.text_field == "texts":  # a list of texts (retrieval): the first
      text = pipeline.choose_text(text, "first", None)
    tok = pipeline._load_tokenizer(self.tokenizer_dir)  # pylint: disable=protected-access
    enc = pipeline.encode_texts(tok, [texts.record_str(text)], self.max_len)
    out = {
        "image": image, "text_ids": enc["text_ids"][0], "text_mask": enc["text_mask"][0],
        "valid": np.int32(valid), "index": np.int64(item["index"])
    }
    out.update(tasks.get(self.task).targets(self, record))  # the task's label fields
    return out

  def targets(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw label values (1, 0, -1 uncertain, NaN not mentioned) of the scored columns -> (targets,
    mask): uncertain -> 1 ('ones'), 0 ('zeros') or unscored ('ignore'); not mentioned -> 0
    ('zeros') or unscored ('ignore')."""
    values = raw[self.columns]
    mask = np.ones_like(values)
    unc, blank = values == -1, np.isnan(values)
    values = np.where(unc, {"ones": 1.0, "zeros": 0.0, "ignore": 0.0}[self.uncertain], values)
    if self.uncertain == "ignore":
      mask[unc] = 0
    values = np.where(blank, 0.0, values)
    if self.blank == "ignore":
      mask[blank] = 0
    return values.astype(np.float32), mask.astype(np.float32)


def decoder(config: ml_collections.ConfigDict, builder, tokenizer_dir: str, size: int,
            vocab=()) -> Decode:
  """The Decode transform of a fine-tuning config, for images of `size` pixels."""
  class_names = list(builder.info.metadata.get("class_names", ()))
  labels = list(config.data.labels) if tasks.get(config.task).label_columns else []
  unknown = [n for n in labels if n not in class_names]
  if unknown:
    raise ValueError(f"data.labels {unknown} are not classes of {builder.name}: {class_names}")
  return Decode(config.task, tokenizer_dir, size, config.data.max_len, vocab, class_names, labels,
                config.data.uncertain, config.data.blank)


def train_dataset(config: ml_collections.ConfigDict, builder, indices: np.ndarray, decode: Decode,
                  process_index: int = 0, process_count: int = 1):
  """Infinite iterator of this host's share of shuffled training batches (reshuffled every epoch;
  global batch `train.batch_size`, host p takes rows p, p+P, ...)."""
  ds = grain.MapDataset.source(Subset(builder.as_data_source("train"), indices))
  ds = ds.shuffle(seed=config.seed).repeat().map(decode)
  ds = ds[process_index::process_count]
  ds = ds.batch(config.train.batch_size // process_count, drop_remainder=True)
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=config.data.read_threads,
                        prefetch_buffer_size=config.data.read_buffer))
  if config.data.workers > 0:
    ds = ds.mp_prefetch(
        grain.multiprocessing.MultiprocessingOptions(num_workers=config.data.workers,
                                                     per_worker_buffer_size=2))
  return iter(ds)


def eval_batches(config: ml_collections.ConfigDict, builder, split: str, indices: np.ndarray,
                 decode: Decode):
  """Every record of `indices`, once, in order, as full batches of `eval.batch_size`: the last one
  is padded with rows of valid = 0. Every host reads the same batches (they are small)."""
  ds = grain.MapDataset.source(Subset(builder.as_data_source(split), indices)).map(decode)
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=config.data.read_threads,
                        prefetch_buffer_size=config.data.read_buffer))
  size, rows = config.eval.batch_size, []
  for example in ds:
    rows.append(example)
    if len(rows) == size:
      yield _stack(rows)
      rows = []
  if rows:
    pad = {k: np.zeros_like(v) for k, v in rows[0].items()}
    yield _stack(rows + [pad] * (size - len(rows)))


def _stack(rows: list[dict]) -> dict:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
