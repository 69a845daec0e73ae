"""Tokenizers: train a BERT-style uncased WordPiece on report text, or load any local HF tokenizer.

Trained tokenizers are saved with `save_pretrained` and reloaded with `AutoTokenizer`, so the
training run and every later run use the very same ids; training is a pure function of the texts
and the vocabulary size, so two runs with the same config train the same tokenizer.
"""
import collections
import heapq
import os
from typing import Iterable

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
import transformers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in trained tokenizers
# Any of these marks a directory as holding a tokenizer AutoTokenizer can read.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model")


def wordpiece_vocab(texts: Iterable[str], vocab_size: int, normalizer=None,
                    pre_tokenizer=None) -> list[str]:
  """The WordPiece vocabulary of `texts`, as a pure function of them and vocab_size: SPECIAL_TOKENS,
  every character (and its '##' continuation form) in sorted order, then the merges in the order
  learnt, each time the most frequent adjacent pair of pieces, ties to the smallest pair.
  Hugging Face's trainer learns the same kind of vocabulary but breaks ties in hash-map order, so
  two trainings on the same texts differ."""
  counts = collections.Counter()
  for text in texts:
    if normalizer is not None:
      text = normalizer.normalize_str(text)
    words = (pre_tokenizer.pre_tokenize_str(text)
             if pre_tokenizer is not None else [(w, None) for w in text.split()])
    counts.update(w for w, _ in words)
  words = sorted(counts)  # a fixed order: ids of words below
  pieces = [[w[0]] + ["##" + c for c in w[1:]] for w in words]
  freq = [counts[w] for w in words]
  vocab = list(SPECIAL_TOKENS) + sorted({p for ps in pieces for p in ps} - set(SPECIAL_TOKENS))
  known = set(vocab)

  pair_count = collections.Counter()
  where = collections.defaultdict(set)  # pair -> ids of the words holding it
  for i, ps in enumerate(pieces):
    for pair in zip(ps, ps[1:]):
      pair_count[pair] += freq[i]
      where[pair].add(i)
  heap = [(-n, pair) for pair, n in pair_count.items()]
  heapq.heapify(heap)
  while len(vocab) < vocab_size and heap:
    n, pair = heapq.heappop(heap)
    if pair_count.get(pair, 0) != -n or n == 0:
      continue  # a stale entry: the count changed since it was pushed
    first, second = pair
    merged = first + second[2:]
    for i in sorted(where.pop(pair, ())):
      ps, f = pieces[i], freq[i]
      for old in zip(ps, ps[1:]):
        pair_count[old] -= f
      out, j = [], 0
      while j < len(ps):
        if j + 1 < len(ps) and ps[j] == first and ps[j + 1] == second:
          out.append(merged)
          j += 2
        else:
          out.append(ps[j])
          j += 1
      pieces[i] = out
      for new in zip(out, out[1:]):
        pair_count[new] += f
        where[new].add(i)
        heapq.heappush(heap, (-pair_count[new], new))
    pair_count.pop(pair, None)
    if merged not in known:
      known.add(merged)
      vocab.append(merged)
  return vocab


def train_wordpiece(texts: Iterable[str], vocab_size: int,
                    out_dir: str) -> transformers.PreTrainedTokenizerFast:
  """Trains an uncased WordPiece (`wordpiece_vocab`: the same texts always give the same
  vocabulary) with [CLS] $A [SEP] post-processing, saves it to `out_dir` (loadable with
  AutoTokenizer) and returns it."""
  normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                          strip_accents=True, lowercase=True)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  vocab = wordpiece_vocab(texts, vocab_size, normalizer, pre_tokenizer)
  tok = tokenizers.Tokenizer(
      models.WordPiece({piece: i for i, piece in enumerate(vocab)}, unk_token="[UNK]",
                       max_input_chars_per_word=100))
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.WordPiece(prefix="##")
  cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                              unk_token="[UNK]", cls_token="[CLS]",
                                              sep_token="[SEP]", mask_token="[MASK]",
                                              padding_side="right", truncation_side="right",
                                              do_lower_case=True)
  fast.save_pretrained(out_dir)
  return fast


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """Loads a local HF tokenizer directory (ours, bert-base-uncased, roberta-base, ...) offline."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    raise FileNotFoundError(
        f"tokenizer directory {path!r} has none of the tokenizer files {_TOKENIZER_FILES}")
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def special_ids(tokenizer) -> np.ndarray:
  """Sorted int32 array of all special token ids (never masked, predicted or ignored as words)."""
  return np.array(sorted(set(tokenizer.all_special_ids)), np.int32)


def encode(tokenizer, texts: list[str], max_len: int) -> dict:
  """Tokenizes with the tokenizer's own special tokens, truncated and right-padded to max_len:
  {"input_ids": int32 [B, max_len], "attention_mask": int32 [B, max_len]}."""
  if tokenizer.pad_token_id is None:
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; set one to encode")
  out = tokenizer(list(texts), max_length=max_len, padding="max_length", truncation=True,
                  padding_side="right", return_attention_mask=True, return_tensors="np")
  return {
      "input_ids": out["input_ids"].astype(np.int32),  # [B, max_len]
      "attention_mask": out["attention_mask"].astype(np.int32)
  }  # [B, max_len]
