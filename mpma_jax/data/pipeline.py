"""Grain input pipeline for pre-training: source -> shuffle -> repeat -> tokenize + paired masking
-> per-host shard -> batch -> (worker processes).

Each example's masks depend only on (seed, epoch, example index), so they do not change with the
number of workers or hosts. A batch is a dict of NumPy arrays (`BATCH_FIELDS`):

  image          uint8 [B, H, W, 3]   the image (normalised on device)
  text_ids       int32 [B, L]         the report's token ids (clean)
  text_mask      int32 [B, L]         1 for real tokens (incl. [CLS]/[SEP]), 0 for padding
  word_mask      int32 [B, L]         1 for real words only (no special tokens, no padding)
  mlm_ids        int32 [B, L]         text_ids after 80/10/10 replacement at the chosen positions
  mlm_labels     int32 [B, L]         original id at chosen positions, -100 elsewhere
  image_keep     int32 [B, n_keep]    visible patch indices (static count)
  image_restore  int32 [B, N]         inverse permutation: patch j is masked iff restore[j] >= n_keep
  index          int64 [B]            example index in its source
"""
import functools
from typing import Any, Optional

import grain
import jax
import ml_collections
import numpy as np

from mpma_jax import masking
from mpma_jax.data import synthetic, tokenizer as tokenizers

BATCH_FIELDS = ("image", "text_ids", "text_mask", "word_mask", "mlm_ids", "mlm_labels",
                "image_keep", "image_restore", "index")


def make_source(config: ml_collections.ConfigDict, split: str, num_examples: int):
  """The random-access source named by config.data.name."""
  name = config.data.name
  if name == "synthetic":
    return synthetic.SyntheticSource(split, num_examples, config.model.image.size, seed=config.seed)
  raise ValueError(f"unknown data.name {name!r}; available: 'synthetic'")


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
  return tokenizers.load_tokenizer(path)


def encode_texts(tokenizer, texts, max_len: int) -> dict:
  """Tokenize -> text_ids, text_mask, word_mask [B, L] (int32)."""
  enc = tokenizers.encode(tokenizer, list(texts), max_len)
  ids, mask = enc["input_ids"], enc["attention_mask"]
  word = mask.astype(bool) & ~np.isin(ids, tokenizers.special_ids(tokenizer))
  return {"text_ids": ids, "text_mask": mask, "word_mask": word.astype(np.int32)}


class PairedMasking(grain.transforms.MapWithIndex):
  """Tokenizes the report and draws the paired image/text masks for one example.

  Picklable: the tokenizer is loaded lazily in each worker process from its directory.
  """

  def __init__(self, tokenizer_dir: str, max_len: int, num_patches: int, num_records: int,
               seed: int, masking_config: ml_collections.ConfigDict):
    self.tokenizer_dir = tokenizer_dir
    self.max_len = max_len
    self.num_patches = num_patches
    self.num_records = num_records
    self.seed = seed
    self.cfg = dict(masking_config)

  def map_with_index(self, position: int, example: dict) -> dict:
    tok = _load_tokenizer(self.tokenizer_dir)
    text = {k: v[0] for k, v in encode_texts(tok, [example["report"]], self.max_len).items()}
    special = tokenizers.special_ids(tok)
    random_ids = np.setdiff1d(np.arange(len(tok), dtype=np.int32), special)
    masks = masking.paired_masks(
        self.seed, position // self.num_records, int(example["index"]),
        num_patches=self.num_patches, image_mask_ratio=self.cfg["image_ratio"],
        input_ids=text["text_ids"], candidate_mask=text["word_mask"].astype(bool),
        text_mask_ratio=self.cfg["text_ratio"], mask_id=tok.mask_token_id, random_ids=random_ids,
        mask_prob=self.cfg["mask_prob"], random_prob=self.cfg["random_prob"])
    return {"image": example["image"], **text, **masks, "index": np.int64(example["index"])}


def pretrain_dataset(config: ml_collections.ConfigDict, tokenizer_dir: str,
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
  source = make_source(config, "train", config.data.num_train)
  image = config.model.image
  transform = PairedMasking(tokenizer_dir, config.data.max_len, (image.size // image.patch) ** 2,
                            len(source), config.seed, config.masking)
  ds = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat()
  ds = ds.map_with_index(transform)
  ds = ds[process_index::process_count]  # each host reads its own examples
  ds = ds.batch(global_batch // process_count, drop_remainder=True)
  ds = ds.to_iter_dataset()
  if config.data.workers > 0:
    ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=config.data.workers, per_worker_buffer_size=config.data.prefetch))
  return ds


def eval_pairs(config: ml_collections.ConfigDict, tokenizer, num_pairs: int,
               split: str = "test") -> dict[str, Any]:
  """Held-out (image, report) pairs for retrieval: image [N, H, W, 3], text_ids/text_mask [N, L]."""
  source = make_source(config, split, num_pairs)
  examples = [source[i] for i in range(len(source))]
  text = encode_texts(tokenizer, [e["report"] for e in examples], config.data.max_len)
  return {"image": np.stack([e["image"] for e in examples]), **text}
