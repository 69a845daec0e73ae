"""Tokenizers: train a BERT-style uncased WordPiece on report text, or load any local HF tokenizer.

Trained tokenizers are saved with `save_pretrained` and reloaded with `AutoTokenizer`, so the
training run and every later run use the very same ids (training itself is not repeatable).
"""
import os
from typing import Iterable

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
import transformers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in trained tokenizers
# Any of these marks a directory as holding a tokenizer AutoTokenizer can read.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model")


def train_wordpiece(texts: Iterable[str], vocab_size: int,
                    out_dir: str) -> transformers.PreTrainedTokenizerFast:
  """Trains an uncased WordPiece with [CLS] $A [SEP] post-processing, saves it to `out_dir`
  (loadable with AutoTokenizer) and returns it."""
  tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=True, lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      continuing_subword_prefix="##")
  tok.train_from_iterator(texts, trainer)
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
