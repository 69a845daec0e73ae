"""Fine-tuning and evaluation end to end on the built-in downstream sets: a tiny pre-trained run,
then VQA (both protocols), multi-modal classification, image-only classification (fine-tune and
linear probe) and retrieval; plus the protocol split logic and the parameter transfer."""
import json
import os

import jax
import numpy as np
import pytest

from mpma_jax import checkpoint, evaluate, finetune, retrieval, suite
from mpma_jax.data import builders, downstream, text
from mpma_jax.data.builders import synthetic_downstream as sd
from mpma_jax.models.mpma import MPMA
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # the slow tier: fine-tunes the shared pre-trained run on every task type


def ft_config(name: str, data_dir: str, variant: str = ""):
  """configs/finetune/<name>.py[:variant] for the 32 px test model on data_dir."""
  config = suite.load_task_config(name, variant)
  config.data_dir = data_dir
  config.image_size = 0  # the pre-training size (32 px)
  config.data.update(read_threads=2, read_buffer=16, max_len=24)
  config.eval.batch_size = 32
  return config


VQA, CLS, CHEST = ("synthetic_vqa/n48_e12_s32_seed0", "synthetic_cls/n96_e48_s32_seed0",
                   "synthetic_chest/n96_e32_s32_seed0")  # the sets built by downstream_dir


def test_prior_and_clean_plans(downstream_dir):
  b = sd.make_vqa(downstream_dir, 48, 32, num_eval=12)
  config = ft_config("vqa_rad", downstream_dir)
  prior = downstream.plan(b, config, "prior")
  clean = downstream.plan(b, config, "clean")
  source = b.as_data_source("train")
  image_of = lambda i: source[int(i)]["image_id"]
  # synthetic_vqa has a validation split: both protocols select on it and train on all of train.
  assert prior.select[0] == clean.select[0] == "validation" and not prior.selected_on_test
  assert len(prior.train[1]) == len(clean.train[1]) == len(source)
  # prior's vocabulary holds every split's answers; clean's only the training answers.
  everything = downstream.answer_vocab(b, ["train", "validation", "test"])
  assert prior.vocab == everything
  assert clean.vocab == downstream.answer_vocab(b, ["train"]) and set(
      clean.vocab) <= set(everything)

  # Without a validation split (VQA-RAD's layout): prior selects on test and says so; clean carves
  # whole images out of train with the seed, disjoint from what trains.
  no_val = _WithoutValidation(b)
  prior = downstream.plan(no_val, config, "prior")
  assert prior.selected_on_test and "selected on the 'test' split" in prior.notes[0]
  clean = downstream.plan(no_val, config, "clean")
  train, val = clean.train[1], clean.select[1]
  assert clean.select[0] == "train" and not clean.selected_on_test
  assert set(train).isdisjoint(val) and len(train) + len(val) == len(source)
  assert {image_of(i) for i in train}.isdisjoint({image_of(i) for i in val})
  n_images = len({image_of(i) for i in range(len(source))})
  assert len({image_of(i) for i in val}) == round(0.1 * n_images)
  again = downstream.plan(no_val, config, "clean")
  assert np.array_equal(again.select[1], val)  # fixed seed
  config.seed = 1
  assert not np.array_equal(downstream.plan(no_val, config, "clean").select[1], val)
  # The clean vocabulary is built from the carved training part only.
  assert clean.vocab == downstream.answer_vocab(no_val, ["train"], {"train": train})

  config.seed = 0
  config.data.label_fraction = 0.1  # a seeded tenth of what trains; validation unchanged
  few = downstream.plan(no_val, config, "clean")
  assert len(few.train[1]) == round(0.1 * len(train)) and set(few.train[1]) <= set(train)
  assert np.array_equal(few.select[1], val) and "10% of the training labels" in few.notes[-1]


class _WithoutValidation:
  """A built dataset seen without its validation split (the layout of VQA-RAD / CheXpert)."""
  def __init__(self, b):
    self._b = b
    self.name = b.name
    self.info = type("Info", (),
                     {"splits": {k: v for k, v in b.info.splits.items() if k != "validation"}})()

  def as_data_source(self, split):
    return self._b.as_data_source(split)


def test_image_classification_targets_follow_the_uncertainty_policy():
  d = downstream.Decode("image_classification", "", 8, 4, class_names=["a", "b", "c", "d"],
                        labels=["d", "b", "a"], uncertain="ones", blank="zeros")
  raw = np.array([1.0, -1.0, 0.0, np.nan], np.float32)  # a=1, b=uncertain, c=0, d=blank
  t, m = d.targets(raw)
  assert t.tolist() == [0.0, 1.0, 1.0] and m.tolist() == [1, 1, 1]
  d.uncertain, d.blank = "ignore", "ignore"
  t, m = d.targets(raw)
  assert m.tolist() == [0, 0, 1] and t[2] == 1.0
  d.uncertain = "zeros"
  assert d.targets(raw)[0].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.faults
def test_a_text_longer_than_the_pretrained_positions_is_refused():
  """MELINDA's 128 caption tokens on tiny_config's 64 BERT positions: a one-line error naming the
  field and the limit, not the NaN that a gather past the position table gives."""
  config = suite.load_task_config("melinda", "")
  pre_model = tiny_config().model
  with pytest.raises(
      ValueError, match=r"^data.max_len=128 is longer than the pre-trained text "
      r"encoder reads: its 64 bert positions take at most 64 tokens; set "
      r"data.max_len <= 64$"):
    finetune.model_config(config, pre_model)
  config.data.max_len = 64
  assert finetune.model_config(config, pre_model).text.max_positions == 64
  pre_model.text.update(position_style="roberta", pad_id=1)  # positions 2..L+1
  with pytest.raises(ValueError, match="take at most 62 tokens"):
    finetune.model_config(config, pre_model)


def test_transfer_copies_every_pretrained_leaf_and_resizes_positions(pretrained_run):
  pre_config, params, _, _ = checkpoint.load_init(pretrained_run)
  config = ft_config("vqa_rad", "")
  config.image_size = 48  # 6x6 patches instead of 4x4
  model_cfg = finetune.model_config(config, pre_config.model)
  model = finetune.build_model(config, model_cfg, 5)
  batch = finetune.dummy_batch(config, model_cfg, 5)
  fresh = jax.device_get(model.init(jax.random.key(0), batch, method=model.init_all)["params"])
  fresh = jax.tree.map(np.asarray, __import__("flax").linen.meta.unbox(fresh))
  out, notes = finetune.transfer(fresh, params, model_cfg)
  flat_new, flat_old = finetune._flatten(out["mpma"]), finetune._flatten(params)
  for key, value in flat_new.items():
    if key[-1] == "position_embedding":
      assert value.shape == (1 + 36, flat_old[key].shape[1])
      np.testing.assert_array_equal(value[0], flat_old[key][0])  # CLS row kept
    else:
      np.testing.assert_array_equal(value, flat_old[key])
  assert len(notes) == 1 and "resized" in notes[0]
  # The head keeps its fresh values.
  jax.tree.map(np.testing.assert_array_equal, out["head"], fresh["head"])
  # The head and the model's used modules only: no MIM decoder, MLM head in a VQA model.
  assert "mim_decoder" not in out["mpma"] and "mlm_head" not in out["mpma"]


@pytest.fixture(scope="module")
def vqa_run(pretrained_run, downstream_dir, tmp_path_factory):
  config = ft_config("vqa_rad", downstream_dir)
  config.dataset = VQA
  config.train.update(epochs=2, batch_size=32, log_every=5)
  config.optim.lr = 2e-4
  workdir = str(tmp_path_factory.mktemp("vqa"))
  return workdir, finetune.finetune(config, pretrained_run, workdir, log_print=lambda s: None)


def test_vqa_runs_both_protocols_with_their_vocabularies_and_the_majority_baseline(
    vqa_run, downstream_dir):
  workdir, results = vqa_run
  assert set(results) == {"prior", "clean"}
  b = builders.builder(VQA, downstream_dir)
  test = b.as_data_source("test")
  for protocol, r in results.items():
    test_m, base = r["test"], r["majority_baseline"]
    assert r["num_test"] == test_m["n_open"] + test_m["n_closed"] == len(test)
    assert 0 <= test_m["overall"] <= 1 and len(r["history"]) == 2
    saved = json.load(open(os.path.join(workdir, protocol, "results.json")))
    assert saved["test"]["overall"] == pytest.approx(test_m["overall"])
    assert os.listdir(os.path.join(workdir, protocol, "checkpoints")) == [str(r["best_epoch"])]
    vocab = json.load(open(os.path.join(workdir, protocol, "vocab.json")))
    assert len(vocab) == r["num_answers"]
    # The majority baseline answers "yes"/"no" (whichever training majority) on every closed
    # question: its closed accuracy is that answer's share of the test's closed questions.
    closed = [
        text.accepted_answers(test[i]["answer"])[0] for i in range(len(test))
        if test[i]["answer_type"] == b"closed"
    ]
    share = max(closed.count("yes"), closed.count("no")) / len(closed)
    assert base["closed"] in (pytest.approx(share), pytest.approx(1 - share))
  assert results["prior"]["num_answers"] >= results["clean"]["num_answers"]


def test_mpma_eval_recomputes_the_runs_test_metrics_from_its_checkpoint(vqa_run):
  workdir, results = vqa_run
  again = evaluate.evaluate_finetuned(workdir, "clean")
  for k in ("open", "closed", "overall"):
    assert again[k] == pytest.approx(results["clean"]["test"][k])
  assert again["checkpoint"] == results["clean"]["best_epoch"]
  rows = suite.table_rows("synthetic_vqa", results)
  assert [r["protocol"] for r in rows] == ["prior", "clean"]
  assert rows[0]["majority closed"] == results["prior"]["majority_baseline"]["closed"]


def test_multimodal_classification_learns_beyond_chance(pretrained_run, downstream_dir, tmp_path):
  """synthetic_cls: the modality (4 classes) from the image; the caption never names it."""
  config = ft_config("melinda", downstream_dir)
  config.dataset = CLS
  config.train.update(epochs=6, batch_size=16)
  config.optim.lr = 5e-4
  (r,) = finetune.finetune(config, pretrained_run, str(tmp_path), log_print=lambda s: None).values()
  assert r["num_test"] == 48 and r["test"]["accuracy"] >= 0.45  # chance: 0.25
  assert r["history"][-1]["loss"] < r["history"][0]["loss"]


def test_image_classification_finetune_and_linear_probe(pretrained_run, downstream_dir, tmp_path):
  """synthetic_chest, 4 labels, mean AUC. The linear probe leaves every pre-trained weight exactly
  as it was and trains the head only."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _, pretrained, _, _ = checkpoint.load_init(pretrained_run)
  for variant in ("finetune_100", "probe_100"):
    config = ft_config("chexpert", downstream_dir, variant)
    config.dataset = CHEST
    config.data.labels = sd.CHEST_CLASSES
    config.data.test_split = "test"
    config.train.update(epochs=2, batch_size=32)
    config.optim.lr = 1e-3
    workdir = tmp_path / variant
    (r,) = finetune.finetune(config, pretrained_run, str(workdir),
                             log_print=lambda s: None).values()
    auc = r["test"]
    assert set(sd.CHEST_CLASSES) <= set(auc) and 0 <= auc["mean"] <= 1 and r["num_test"] == 32
    ckpt = workdir / "clean" / "checkpoints" / str(r["best_epoch"])
    params = ocp.StandardCheckpointer().restore(str((ckpt / "default").resolve()))
    old, new = finetune._flatten(pretrained), finetune._flatten(params["mpma"])
    changed = [k for k in new if not np.array_equal(new[k], old[k])]
    if variant.startswith("probe"):
      assert changed == []
    else:
      assert any(k[0] == "image_encoder" for k in changed)
    assert set(params) == {"mpma", "head"} and set(params["mpma"]) == {"image_encoder"}


def test_zero_shot_retrieval_equals_the_pretraining_evaluation_and_reranks(
    pretrained_run, data_dir, tmp_path):
  """roco.py:zero_shot on the synthetic pairs gives exactly the recall of retrieval.evaluate on
  the same pairs; ITM re-ranking reorders only each query's top-k."""
  from mpma_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mpma_jax.data import tokenizer as tokenizers
  pre = tiny_config()
  name = f"synthetic/n{pre.data.num_train}_e{pre.data.num_eval}_s32_seed0"
  config = ft_config("roco", data_dir)
  config.dataset = name
  config.retrieval.rerank_k = 3
  (r,) = finetune.finetune(config, pretrained_run, str(tmp_path), log_print=lambda s: None).values()
  params, _ = checkpoint.restore_params(pretrained_run)
  tok = tokenizers.load_tokenizer(os.path.join(pretrained_run, "tokenizer"))
  pre.eval.num_pairs = pre.data.num_eval
  pairs = pipeline.eval_pairs(pre, tok, pre.eval.num_pairs, data_dir)
  pairs = {k: v for k, v in pairs.items() if k != "word_mask"}
  expected = retrieval.evaluate(retrieval.make_embed_fn(MPMA.from_config(pre)), params, pairs, 32)
  for k, v in expected.items():
    assert r["test"][k] == pytest.approx(v), k
  assert r["test"]["itm_rerank_k"] == 3 and r["test"]["itm_n"] == pre.data.num_eval
  # Re-ranking reorders within the top 3 only: R@k for k >= 3 is unchanged.
  for d in ("i2t", "t2i"):
    assert r["test"][f"itm_{d}_r5"] == pytest.approx(r["test"][f"{d}_r5"])
    assert r["test"][f"itm_{d}_r10"] == pytest.approx(r["test"][f"{d}_r10"])


def test_suite_lists_tasks_without_data_and_prints_a_table(tmp_path):
  table, rows = suite.run("unused", str(tmp_path / "nothing"), str(tmp_path / "out"))
  assert rows == [] and "(no task ran)" in table
  assert "vqa_rad, slake, vqa_med_2019, melinda, roco_retrieval:zero_shot" in table
  assert open(tmp_path / "out" / "suite.md").read().strip() == table.strip()


def test_vqa_image_cache_returns_the_same_examples_and_stays_bounded(downstream_dir, tokenizer_dir):
  b = builders.builder(VQA, downstream_dir)
  source = b.as_data_source("train")
  cached = downstream.Decode("vqa", tokenizer_dir, 32, 16, ["yes", "no"], cache_images=2)
  plain = downstream.Decode("vqa", tokenizer_dir, 32, 16, ["yes", "no"], cache_images=0)
  for i in list(range(40)) + [0, 1, 2]:  # several questions per image, then images seen before
    a, c = plain.map({"record": source[i],
                      "index": i}), cached.map({"record": source[i], "index": i})
    for k in a:
      np.testing.assert_array_equal(a[k], c[k])
    assert len(cached._cache) <= 2
  c["image"][:] = 0  # a batch row is a copy: the cached image is untouched
  again = cached.map({"record": source[2], "index": 2})
  np.testing.assert_array_equal(again["image"],
                                plain.map({"record": source[2], "index": 2})["image"])


@pytest.mark.parametrize("choice,expected", [("prior", -np.log(4)), ("zero", 0.0)])
def test_vqa_head_output_bias_is_a_choice(choice, expected):
  """head_output_bias=prior starts the 5 answer logits at log-odds of 1/5; zero (M3AE) at 0."""
  config = suite.load_task_config("vqa_rad")
  config.head_output_bias = choice
  model_cfg = tiny_config().model
  model = finetune.build_model(config, model_cfg, 5)
  batch = finetune.dummy_batch(config, model_cfg, 5)
  params = model.init(jax.random.key(0), batch)
  bias = np.asarray(jax.tree_util.tree_leaves(params["params"]["head"]["fc2"]["bias"])[0])
  np.testing.assert_allclose(bias, np.full(5, expected), rtol=1e-6)
  config.head_output_bias = "ones"
  with pytest.raises(ValueError, match="head_output_bias"):
    finetune.build_model(config, model_cfg, 5)
