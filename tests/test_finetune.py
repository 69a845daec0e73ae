"""Fine-tuning and evaluation end to end on the built-in downstream sets: a tiny pre-trained run,
then VQA (both protocols), multi-modal classification, image-only classification (fine-tune and
linear probe) and retrieval; plus the protocol split logic and the parameter transfer."""
import json
import os

import jax
import numpy as np
import pytest

from mpma_jax import finetune, main
from mpma_jax.data import builders, downstream
from mpma_jax.data.builders import synthetic_downstream as sd
from tests.conftest import tiny_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "finetune")


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, data_dir):
  """A tiny pre-training run directory (config.json, tokenizer/, checkpoints/) after 20 steps."""
  from mpma_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  config = tiny_config()
  tok, tok_dir = main.prepare_tokenizer(config, workdir, data_dir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  train.train_and_evaluate(config, workdir, tok, tok_dir, data_dir)
  return workdir


@pytest.fixture(scope="session")
def downstream_dir(tmp_path_factory):
  """synthetic_vqa / synthetic_cls / synthetic_chest at 32 px."""
  out = str(tmp_path_factory.mktemp("downstream"))
  sd.make_vqa(out, 48, 32, num_eval=12).download_and_prepare()
  sd.make_cls(out, 96, 32, num_eval=24).download_and_prepare()
  sd.make_chest(out, 96, 32, num_eval=32).download_and_prepare()
  return out


def ft_config(name: str, data_dir: str, variant: str = ""):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path = os.path.join(CONFIGS, f"{name}.py") + (f":{variant}" if variant else "")
  config = config_flags.config_flags._LoadConfigModule("cfg", path.split(":")[0]).get_config(
      *([variant] if variant else []))
  config.data_dir = data_dir
  config.image_size = 0  # the pre-training size (32 px)
  config.data.update(read_threads=2, read_buffer=16, max_len=24)
  config.eval.batch_size = 32
  return config


VQA, CLS, CHEST = ("synthetic_vqa/n48_e12_s32_seed0", "synthetic_cls/n96_e24_s32_seed0",
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
  assert clean.vocab == downstream.answer_vocab(b, ["train"]) and set(clean.vocab) <= set(everything)

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
    self.info = type("Info", (), {"splits": {k: v for k, v in b.info.splits.items()
                                             if k != "validation"}})()

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


def test_transfer_copies_every_pretrained_leaf_and_resizes_positions(pretrained_run):
  pre_config, params, _, _ = finetune.load_init(pretrained_run)
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


def test_vqa_finetune_beats_the_majority_baseline_under_both_protocols(
    pretrained_run, downstream_dir, tmp_path):
  config = ft_config("vqa_rad", downstream_dir)
  config.dataset = VQA
  config.train.update(epochs=4, batch_size=32, log_every=5)
  config.optim.lr = 1e-3
  results = finetune.finetune(config, pretrained_run, str(tmp_path / "ft"), log_print=lambda s: None)
  assert set(results) == {"prior", "clean"}
  for protocol, r in results.items():
    test, base = r["test"], r["majority_baseline"]
    assert r["num_test"] == test["n_open"] + test["n_closed"] > 100
    assert test["closed"] > base["closed"] + 0.05, (protocol, test, base)
    assert len(r["history"]) == 4 and r["best_epoch"] in (1, 2, 3, 4)
    saved = json.load(open(tmp_path / "ft" / protocol / "results.json"))
    assert saved["test"]["overall"] == pytest.approx(test["overall"])
    assert os.listdir(tmp_path / "ft" / protocol / "checkpoints") == [str(r["best_epoch"])]
  assert results["prior"]["num_answers"] >= results["clean"]["num_answers"]
