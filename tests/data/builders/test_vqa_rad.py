"""VQA-RAD: the real copy in ../shared/data/vqa_rad builds with the published counts, and a copy
with a missing and a corrupt image skips and counts exactly the affected questions."""
import collections
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from mpma_jax.data import builders, images, text

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "shared", "data", "vqa_rad")
REAL = os.path.abspath(REAL)

needs_real = pytest.mark.skipif(not os.path.isdir(REAL),
                                reason="../shared/data/vqa_rad not present")


@pytest.fixture(scope="module")
def real_built(tmp_path_factory):
  """The real VQA-RAD built once for this module: (builder, report, data_dir)."""
  data_dir = str(tmp_path_factory.mktemp("vqa_rad_data"))
  b, report = builders.build("vqa_rad", REAL, data_dir)
  return b, report, data_dir


@needs_real
def test_real_vqa_rad_counts_and_vocab(real_built):
  b, report, _ = real_built
  assert report == {
      "train": {"written": 3064, "skipped": {}}, "test": {"written": 451, "skipped": {}}
  }
  answers = []
  for split in ("train", "test"):
    source = b.as_data_source(split)
    answers += [source[i]["answer"] for i in range(len(source))]
  assert len(text.answer_vocab(answers)) == 498  # the prior protocol's class count
  test = b.as_data_source("test")
  types = collections.Counter(test[i]["answer_type"] for i in range(len(test)))
  assert types == {b"closed": 272, b"open": 179}  # 'CLOSED ' with a trailing space normalised


@needs_real
def test_missing_and_corrupt_images_are_counted_per_question(tmp_path):
  manual = tmp_path / "manual"
  (manual / "images").mkdir(parents=True)
  test = json.load(open(os.path.join(REAL, "testset.json")))
  train = json.load(open(os.path.join(REAL, "trainset.json")))
  train = [r for r in train if r["image_name"] == test[0]["image_name"]]
  json.dump(train, open(manual / "trainset.json", "w"))
  json.dump(test, open(manual / "testset.json", "w"))
  names = sorted({r["image_name"] for r in test} - {test[0]["image_name"]})
  missing, corrupt = names[0], names[1]
  for name in names[2:] + [test[0]["image_name"]]:
    shutil.copy(os.path.join(REAL, "images", name), manual / "images" / name)
  data = open(os.path.join(REAL, "images", corrupt), "rb").read()
  (manual / "images" / corrupt).write_bytes(data[:len(data) // 3])  # truncated JPEG
  _, report = builders.build("vqa_rad", str(manual), str(tmp_path / "out"))
  n_missing = sum(r["image_name"] == missing for r in test)
  n_corrupt = sum(r["image_name"] == corrupt for r in test)
  assert report["test"]["skipped"] == {"missing image": n_missing, "unreadable image": n_corrupt}
  assert report["test"]["written"] == len(test) - n_missing - n_corrupt
  assert report["train"] == {"written": len(train), "skipped": {}}


def test_wrong_manual_dir_names_the_expected_file(tmp_path):
  (tmp_path / "trainset.json").write_text("[]")
  with pytest.raises(FileNotFoundError, match="testset.json"):
    builders.build("vqa_rad", str(tmp_path), str(tmp_path / "out"))


def test_a_split_with_nothing_usable_is_a_clear_error(tmp_path):
  (tmp_path / "images").mkdir()
  record = {
      "qid": 1, "image_name": "absent.jpg", "question": "is it?", "answer": "yes",
      "answer_type": "CLOSED", "image_organ": "HEAD"
  }
  for name in ("trainset.json", "testset.json"):
    json.dump([record], open(tmp_path / name, "w"))
  with pytest.raises(ValueError, match="no usable examples.*missing image"):
    builders.build("vqa_rad", str(tmp_path), str(tmp_path / "out"))


def _record(qid, image_name="synpic1.jpg", question="Is there a mass?", answer="yes"):
  return {
      "qid": qid, "image_name": image_name, "image_organ": "HEAD", "answer": answer,
      "answer_type": "CLOSED ", "question_type": "PRES", "question": question,
      "phrase_type": "freeform"
  }


def _tiny(root, train):
  """trainset.json (`train`, '@@' in a string written as the byte 0xff), testset.json (one good
  question) and images/synpic1.jpg."""
  (root / "images").mkdir(parents=True)
  (root / "images" / "synpic1.jpg").write_bytes(images.encode_jpeg(np.zeros((8, 8), np.uint8)))
  content = json.dumps(train, ensure_ascii=False).encode().replace(b"@@", b"\xff")
  (root / "trainset.json").write_bytes(content)
  json.dump([_record(100)], open(root / "testset.json", "w"))


def test_bad_records_are_counted(tmp_path):
  no_name, no_qid = _record(2), _record(3)
  del no_name["image_name"], no_qid["qid"]
  _tiny(tmp_path, [
      _record(1, answer=3), no_name, no_qid,
      _record(4, image_name=""),
      _record(5, image_name="."),
      _record(6, question="Is there a m@@ss?"),
      _record(7, answer=None),
      _record(8, question={"en": "Is there a mass?"}), [1, 2]
  ])
  b, report = builders.build("vqa_rad", str(tmp_path), str(tmp_path / "out"))
  assert report == {
      "train": {
          "written": 1, "skipped": {
              "missing field": 2, "no image name": 1, "missing image": 1, "non-UTF-8 text": 1,
              "empty answer": 1, "malformed record": 2
          }
      }, "test": {"written": 1, "skipped": {}}
  }
  first = b.as_data_source("train")[0]
  assert (first["id"], first["answer"], first["answer_type"]) == (b"1", b"3", b"closed")


@pytest.mark.parametrize("content, message", [
    (b'[{"qid": 1, "image_name": "synpic1.jpg"', r"not valid JSON \(Expecting .*line 1 column"),
    (b'[{"qid": 1}, \xff]', r"not valid JSON \(Expecting value: line 1 column 14"),
    (b'{"questions": []}', "expected a JSON list of questions, found dict"),
])
def test_unreadable_file_is_a_one_line_error(tmp_path, content, message):
  _tiny(tmp_path, [_record(1)])
  (tmp_path / "testset.json").write_bytes(content)
  with pytest.raises(ValueError, match=r"testset\.json: " + message):
    builders.build("vqa_rad", str(tmp_path), str(tmp_path / "out"))


@needs_real
def test_real_vqa_rad_through_the_downstream_pipeline(real_built, tmp_path):
  from mpma_jax.data import downstream
  from mpma_jax.data import tokenizer as tokenizers
  b, _, data_dir = real_built
  vocab = downstream.answer_vocab(b, ["train", "test"])
  clean = downstream.answer_vocab(b, ["train"])
  assert len(vocab) == 498 and set(clean) < set(vocab)
  questions = [b.as_data_source("train")[i]["question"].decode() for i in range(200)]
  tokenizers.train_wordpiece(questions, 512, str(tmp_path / "tok"))
  config = ml_collections.ConfigDict(
      {"eval": {"batch_size": 200}, "data": {"read_threads": 4, "read_buffer": 64}})
  decode = downstream.Decode("vqa", str(tmp_path / "tok"), 32, 32, vocab)
  test = np.arange(len(b.as_data_source("test")))
  batches = list(downstream.eval_batches(config, b, "test", test, decode))
  assert len(batches) == 3  # every test question, once; the last batch padded
  valid = np.concatenate([x["valid"] for x in batches])
  assert valid.sum() == 451 and np.all(valid[:451] == 1) and np.all(valid[451:] == 0)
  accepted = np.concatenate([x["accepted"] for x in batches])[:451]
  closed = np.concatenate([x["closed"] for x in batches])[:451]
  assert np.all(accepted.sum(1) == 1) and closed.sum() == 272  # prior vocab covers every answer
  assert batches[0]["image"].shape == (200, 32, 32, 3)
