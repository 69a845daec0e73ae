import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here must load from local files

import numpy as np
import pytest
import transformers

from mpma_jax.data import synthetic, tokenizer

MAX_LEN = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A WordPiece trained once on 2000 reports, and its directory."""
  out = str(tmp_path_factory.mktemp("wordpiece"))
  return tokenizer.train_wordpiece(synthetic.report_corpus(2000), 1024, out), out


def test_reload_gives_identical_ids(trained):
  tok, out = trained
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    assert "tokenizer_class" in json.load(f)  # AutoTokenizer needs the class
  auto = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  loaded = tokenizer.load_tokenizer(out)
  texts = list(synthetic.report_corpus(50, split="test")) + [
      "CT of the CHEST. Two lesions: a small bright nodule in the upper left!"
  ]
  for text in texts:
    ids = tok(text)["input_ids"]
    assert auto(text)["input_ids"] == ids and loaded(text)["input_ids"] == ids
  assert auto.get_vocab() == tok.get_vocab()
  assert 100 < len(tok) <= 1024


def test_special_tokens_are_first(trained):
  tok, _ = trained
  assert tok.convert_tokens_to_ids(list(tokenizer.SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
  assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
          tok.mask_token_id) == (0, 1, 2, 3, 4)
  ids = tokenizer.special_ids(tok)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, np.arange(5))


def test_uncased_bert_style(trained):
  tok, _ = trained
  ids = tok("Ultrasound of the Abdomen.")["input_ids"]
  assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
  assert ids == tok("ultrasound of the abdomen.")["input_ids"]
  assert tok.convert_ids_to_tokens(ids)[1:-1] == ["ultrasound", "of", "the", "abdomen", "."]
  assert tok("ultrasonically")["input_ids"]  # unseen words split into pieces
  weird = tok("zebra café 你好 x-ray ß ##")["input_ids"]  # unknown characters do not crash
  assert tok.unk_token_id in weird


def test_encode_pads_and_truncates(trained):
  tok, _ = trained
  texts = ["ct of the head.", " ".join(["lesion"] * 100)]
  out = tokenizer.encode(tok, texts, 16)
  ids, mask = out["input_ids"], out["attention_mask"]
  assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == np.int32
  n = len(tok(texts[0])["input_ids"])
  np.testing.assert_array_equal(mask[0], np.arange(16) < n)
  assert ids[0, 0] == tok.cls_token_id and ids[0, n - 1] == tok.sep_token_id
  assert (ids[0, n:] == tok.pad_token_id).all()
  assert mask[1].all() and ids[1, -1] == tok.sep_token_id  # truncated, still closed by [SEP]


def test_reports_fit_max_len(trained):
  tok, _ = trained
  reports = list(synthetic.report_corpus(2000, split="validation"))
  lengths = np.array([len(ids) for ids in tok(reports)["input_ids"]])
  print(f"report tokens: max {lengths.max()}, mean {lengths.mean():.1f}")
  assert lengths.max() <= MAX_LEN
  out = tokenizer.encode(tok, reports[:8], MAX_LEN)
  assert (out["input_ids"] == tok.unk_token_id).sum() == 0


def test_roberta_style_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  # The file layout of roberta-base: config.json, vocab.json, merges.txt.
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(synthetic.report_corpus(300), vocab_size=400,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
  bpe.save_model(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
  tok = tokenizer.load_tokenizer(str(tmp_path))
  assert isinstance(tok, transformers.RobertaTokenizer)
  out = tokenizer.encode(tok, ["ct of the chest. no focal abnormality.", "mri"], 12)
  ids, mask = out["input_ids"], out["attention_mask"]
  assert ids.shape == (2, 12) and ids.dtype == np.int32
  assert ids[1, 0] == tok.bos_token_id and mask[1].sum() >= 3
  n = mask[1].sum()
  assert ids[1, n - 1] == tok.eos_token_id and (ids[1, n:] == tok.pad_token_id).all()
  np.testing.assert_array_equal(tokenizer.special_ids(tok), sorted(set(tok.all_special_ids)))


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    tokenizer.load_tokenizer(str(tmp_path / "no_such_dir"))
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    tokenizer.load_tokenizer(str(tmp_path))


@pytest.mark.faults
def test_training_is_a_pure_function_of_the_texts(tmp_path):
  """Same texts, same size: the same files, byte for byte (Hugging Face's trainer breaks ties in
  hash-map order and gave a different vocabulary on every run)."""
  rng = np.random.default_rng(0)
  words = [
      "lung", "opacity", "effusion", "normal", "heart", "size", "no", "acute", "left", "right",
      "pleural", "small", "consolidation", "pneumothorax", "cardiomegaly", "mild"
  ]
  texts = [" ".join(rng.choice(words, 12)) for _ in range(500)]
  digests = []
  for i in range(3):
    tokenizer.train_wordpiece(texts, 120, str(tmp_path / str(i)))
    digests.append(
        {f: (tmp_path / str(i) / f).read_bytes() for f in sorted(os.listdir(tmp_path / str(i)))})
  assert digests[0] == digests[1] == digests[2]
  vocab = tokenizer.wordpiece_vocab(texts, 120)
  assert vocab[:5] == list(tokenizer.SPECIAL_TOKENS) and len(vocab) == len(set(vocab))
  assert "pneumothorax" in vocab and "cardiomegaly" in vocab  # frequent words become one piece
  tok = tokenizer.load_tokenizer(str(tmp_path / "0"))
  assert tok.tokenize("Mild cardiomegaly.") == ["mild", "cardiomegaly", "[UNK]"]


def test_merges_take_the_most_frequent_pair_ties_to_the_smallest():
  # characters first (sorted), then merges: "ab" x3 and "cd" x3 tie, so "ab" comes first; "ef"
  # (x1) is never merged before them
  vocab = tokenizer.wordpiece_vocab(["ab ab ab cd cd cd ef"], 100)
  assert vocab[5:] == ["##b", "##d", "##f", "a", "c", "e", "ab", "cd", "ef"]
  assert tokenizer.wordpiece_vocab(["ab ab ab cd cd cd ef"],
                                   12)[5:] == ["##b", "##d", "##f", "a", "c", "e", "ab"]
