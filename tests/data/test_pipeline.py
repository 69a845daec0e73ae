"""The pre-training input pipeline over built datasets: weighted mixtures, bad images replaced and
counted, truncation counted, worker processes equal the main process, exact resume, and config
errors that fail before training."""
import numpy as np
import pytest

from mpma_jax.data import builders, images, pipeline, synthetic
from mpma_jax.data import tokenizer as tokenizers
from mpma_jax.data.builders import base
from tests.conftest import tiny_config

LONG = " ".join(["the lesion"] * 40)  # far more than max_len tokens


def _png(value: int) -> bytes:
  return images.encode_png(np.full((40, 48, 3), value, np.uint8))


class PairsA(base.Builder):
  """Test pairs: image i is uniformly grey level i; record 3 is corrupt, record 5 is long."""
  N = 12

  def _split_paths(self, manual_dir):
    return {"train": {}, "test": {}}

  def _examples(self, split, **_):
    for i in range(self.N):
      image = b"\xff\xd8 not a jpeg" if i == 3 else _png(10 * i)
      report = LONG if i == 5 else f"finding number {i} is described here"
      yield i, {"id": f"a{i}", "image": image, "texts": [report]}


class PairsB(PairsA):
  """Test pairs of a second source: grey level 200 + i."""
  def _examples(self, split, **_):
    for i in range(self.N):
      yield i, {"id": f"b{i}", "image": _png(200 + i), "texts": [f"other source example {i}"]}


class QuestionsC(PairsA):
  """Test VQA set: not usable for pre-training."""
  TASK = "vqa"

  def _examples(self, split, **_):
    yield 0, {
        "id": "q0", "image_id": "i0", "image": _png(1), "question": "is it grey?", "answer": "yes",
        "answer_type": "closed", "category": "test"
    }


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
  builders.BUILDERS.update(pairs_a=PairsA, pairs_b=PairsB, questions_c=QuestionsC)
  out = str(tmp_path_factory.mktemp("pairs"))
  for name in ("pairs_a", "pairs_b", "questions_c"):
    builders.build(name, out, out)
  return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  tokenizers.train_wordpiece(list(synthetic.report_corpus(300)) + [LONG] * 3, 512, out)
  return out


def _config(name, **data):
  c = tiny_config()
  c.data.update(name=name, **data)
  c.train.batch_size = 8
  return c


def _take(config, tok_dir, data_dir, n_batches, **kw):
  it = iter(pipeline.pretrain_dataset(config, tok_dir, data_dir, **kw))
  return [next(it) for _ in range(n_batches)], it


def test_bad_image_is_replaced_by_the_next_record_and_counted(pairs_dir, tok_dir):
  config = _config("pairs_a")
  (batch,), _ = _take(config, tok_dir, pairs_dir, 1)
  ds, sources = pipeline.mixture(config, pairs_dir)
  decode = pipeline.DecodeAndMask(sources, tok_dir, config)
  tok = tokenizers.load_tokenizer(tok_dir)
  for position in range(24):  # two epochs: every record, the corrupt one included, twice
    example = ds[position]
    out = decode.map_with_index(position, example)
    record = example["record"]
    if record["id"] == b"a3":
      assert out["bad_image"] == 1
      following = sources[0][(example["record_index"] + 1) % PairsA.N]  # the next record
      assert out["image"][0, 0, 0] == int(following["id"][1:]) * 10
    else:
      assert out["bad_image"] == 0
      assert out["image"][0, 0, 0] == int(record["id"][1:]) * 10
    assert out["image"].shape == (32, 32, 3)
    # truncation: counted, and the ids equal what the tokenizer gives at max_len
    direct = pipeline.encode_texts(tok, [record["texts"][0].decode()], config.data.max_len)
    np.testing.assert_array_equal(out["text_ids"], direct["text_ids"][0])
    np.testing.assert_array_equal(out["word_mask"], direct["word_mask"][0])
    assert out["truncated"] == (record["id"] == b"a5")
  assert batch["bad_image"].sum() == sum(ds[p]["record"]["id"] == b"a3" for p in range(8))


def test_mixture_follows_the_weights_and_keeps_sources_apart(pairs_dir, tok_dir):
  config = _config("pairs_a:3,pairs_b:1")
  batches, _ = _take(config, tok_dir, pairs_dir, 6)
  source = np.concatenate([b["source"] for b in batches])
  grey = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
  assert (source == 0).sum() == 36 and (source == 1).sum() == 12  # exactly 3:1 over 48
  assert np.all(grey[source == 1] >= 200) and np.all(grey[source == 0] < 200)


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_resume_exactly(pairs_dir, tok_dir):
  config = _config("pairs_a:1,pairs_b:1")
  want, _ = _take(config, tok_dir, pairs_dir, 4)
  config.data.workers = 2
  got, it = _take(config, tok_dir, pairs_dir, 2)
  state = it.get_state()
  resumed = iter(pipeline.pretrain_dataset(config, tok_dir, pairs_dir))
  resumed.set_state(state)
  got += [next(resumed), next(resumed)]
  for w, g in zip(want, got):
    assert set(w) == set(g) == set(pipeline.BATCH_FIELDS)
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def test_config_errors_fail_before_training(pairs_dir, tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'rocco'.*roco"):
    pipeline.prepare(_config("rocco"), str(tmp_path))
  with pytest.raises(ValueError, match="weight"):
    pipeline.prepare(_config("pairs_a:x"), str(tmp_path))
  with pytest.raises(ValueError, match="data_dir is empty"):
    pipeline.prepare(_config("pairs_a"), "")
  with pytest.raises(FileNotFoundError, match="mpma-data build roco --manual_dir"):
    pipeline.prepare(_config("roco"), str(tmp_path))
  with pytest.raises(ValueError, match="questions_c' is a vqa dataset"):
    pipeline.prepare(_config("pairs_a,questions_c"), pairs_dir)
