"""End to end on the built-in data: the pipeline, a short run whose loss falls, checkpoints."""
import json
import os

import jax
import numpy as np
import pytest

from mpma_jax import checkpoint, optim, retrieval, train
from mpma_jax.data import pipeline, synthetic
from mpma_jax.data import tokenizer as tokenizers
from mpma_jax.models.mpma import MPMA
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # the slow tier: end-to-end training runs


def _batches(config, tokenizer_dir, data_dir, n, **kw):
  it = iter(pipeline.pretrain_dataset(config, tokenizer_dir, data_dir, **kw))
  return [next(it) for _ in range(n)], it


def test_pipeline_batches_have_static_shapes_and_consistent_masks(tokenizer_dir, data_dir):
  config = tiny_config()
  (batch,), _ = _batches(config, tokenizer_dir, data_dir, 1)
  b, length, n = config.train.batch_size, config.data.max_len, 16
  assert set(batch) == set(pipeline.BATCH_FIELDS)
  assert batch["image"].shape == (b, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["image_keep"].shape == (b, 4) and batch["image_restore"].shape == (b, n)
  for k in ("text_ids", "text_mask", "word_mask", "mlm_ids", "mlm_labels"):
    assert batch[k].shape == (b, length), k
  chosen = batch["mlm_labels"] != -100
  assert chosen.any() and np.all(batch["word_mask"][chosen] == 1)  # only real words are chosen
  np.testing.assert_array_equal(batch["mlm_labels"][chosen], batch["text_ids"][chosen])
  np.testing.assert_array_equal(batch["mlm_ids"][~chosen], batch["text_ids"][~chosen])
  np.testing.assert_array_equal(batch["word_mask"] <= batch["text_mask"], True)


def test_pipeline_is_deterministic_and_hosts_split_the_batch(tokenizer_dir, data_dir):
  config = tiny_config()
  first, _ = _batches(config, tokenizer_dir, data_dir, 2)
  again, _ = _batches(config, tokenizer_dir, data_dir, 2)
  for x, y in zip(first, again):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  host0, _ = _batches(config, tokenizer_dir, data_dir, 1, process_index=0, process_count=2)
  host1, _ = _batches(config, tokenizer_dir, data_dir, 1, process_index=1, process_count=2)
  assert len(host0[0]["index"]) == config.train.batch_size // 2
  assert not set(host0[0]["index"]) & set(host1[0]["index"])


def test_iterator_state_resumes_exactly(tokenizer_dir, data_dir):
  config = tiny_config()
  _, it = _batches(config, tokenizer_dir, data_dir, 3)
  state = it.get_state()
  json.dumps(state)  # it is stored as JSON in the checkpoint
  want = next(it)
  fresh = iter(pipeline.pretrain_dataset(config, tokenizer_dir, data_dir))
  fresh.set_state(state)
  got = next(fresh)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tokenizer_dir, data_dir):
  config = tiny_config()
  config.train.update(steps=40, log_every=10, ckpt_every=20, batch_size=16)
  config.optim.lr = 1e-3
  workdir = str(tmp_path_factory.mktemp("run"))
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  result = train.train_and_evaluate(config, workdir, tok, tokenizer_dir, data_dir)
  return config, workdir, result


def test_short_run_loss_falls_and_writes_eval(short_run):
  _, workdir, result = short_run
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [10, 20, 30, 40]
  first, last = train_rows[0], train_rows[-1]
  assert last["loss"] < first["loss"] - 0.5, (first["loss"], last["loss"])
  assert last["mlm"] < first["mlm"]
  assert all(np.isfinite(r["loss"]) for r in train_rows)
  saved = json.load(open(os.path.join(workdir, "eval.json")))
  assert saved["trained"] == result["trained"]
  assert saved["chance"]["i2t_r5"] == pytest.approx(5 / 32)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]


def test_checkpoint_restores_identical_params(short_run, tokenizer_dir, data_dir):
  config, workdir, _ = short_run
  mesh = train.sharding.make_mesh(config.mesh)
  rules = train.sharding.rules(config.mesh)
  model, tx = MPMA.from_config(config), optim.make_optimizer(config)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fresh, _ = train.create_train_state(config, model, tx, mesh, rules)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config)
    it = iter(pipeline.pretrain_dataset(config, tokenizer_dir, data_dir))
    restored = ckpt.restore(40, checkpoint.abstract_like(fresh), it)
    ckpt.close()
  assert int(restored.step) == 40
  # The restored parameters reproduce the run's final retrieval figures exactly.
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  pairs = pipeline.eval_pairs(config, tok, config.eval.num_pairs, data_dir)
  again = retrieval.evaluate(retrieval.make_embed_fn(model), restored.params, pairs,
                             config.eval.batch_size)
  assert again == short_run[2]["trained"]
  # Save -> restore round trip of a state: identical leaves.
  ckpt2 = checkpoint.Checkpointer(os.path.join(workdir, "roundtrip"), config)
  ckpt2.save(1, restored, it)
  ckpt2.manager.wait_until_finished()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    twice = ckpt2.restore(1, checkpoint.abstract_like(fresh), it)
  ckpt2.close()
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(twice)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(restored.params)))


def _mimic_layout(root, n_train: int, n_test: int, n_val: int = 2) -> None:
  """A MIMIC-CXR-JPG copy in the distributed layout: synthetic chest X-rays with reports."""
  import csv  # pylint: disable=g-import-not-at-top

  from mpma_jax.data import images  # pylint: disable=g-import-not-at-top
  rows = []
  for i in range(n_train + n_test + n_val):
    subject, study, dicom = f"1{i:07d}", f"5{i:07d}", f"dcm{i}"
    case = synthetic.sample_case(0, "train", i)
    study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}"
    (study_dir / f"s{study}").mkdir(parents=True)
    (study_dir / f"s{study}" / f"{dicom}.jpg").write_bytes(
        images.encode_jpeg(synthetic.render_image(case, 48, index=i)))
    (study_dir / f"s{study}.txt").write_text(
        f" FINAL REPORT\n FINDINGS: {synthetic.report(0, 'train', i)}\n\n IMPRESSION: "
        f"{case.modality} of the {case.organ} reviewed.\n")
    rows.append((dicom, study, subject,
                 "train" if i < n_train else "test" if i < n_train + n_test else "validate"))
  for name, header, body in (("split", ["dicom_id", "study_id", "subject_id", "split"], rows),
                             ("metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition"], [
                                 (d, su, st, "PA") for d, st, su, _ in rows
                             ]), ("chexpert", [
                                 "subject_id", "study_id", "Atelectasis", "Cardiomegaly",
                                 "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                                 "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
                                 "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"
                             ], [(su, st, *[""] * 14) for _, st, su, _ in rows])):
    with open(root / f"mimic-cxr-2.0.0-{name}.csv", "w", newline="") as f:
      csv.writer(f).writerows([header, *body])


def test_main_job_runs_on_a_real_layout_dataset_by_a_config_change(tmp_path):
  """mpma-data build mimic_cxr, then the pre-training job with data.name/data_dir changed."""
  from mpma_jax.cli import data as cli  # pylint: disable=g-import-not-at-top
  _mimic_layout(tmp_path / "mimic", n_train=24, n_test=8)
  data_dir, workdir = str(tmp_path / "data"), str(tmp_path / "run")
  assert cli.main(
      ["build", "mimic_cxr", "--manual_dir",
       str(tmp_path / "mimic"), "--data_dir", data_dir]) == 0
  config = tiny_config()
  config.data.update(name="mimic_cxr", data_dir=data_dir, text_choice="concat")
  config.train.update(steps=4, log_every=2, ckpt_every=4)
  config.eval.update(num_pairs=8, batch_size=8)
  assert pipeline.data_dir_for(config, workdir) == data_dir
  tok, tok_dir = train.prepare_tokenizer(config, workdir, data_dir)  # builtin: trained on MIMIC
  result = train.train_and_evaluate(config, workdir, tok, tok_dir, data_dir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [2, 4]
  assert all(np.isfinite(r["loss"]) and r["data_bad_image"] == 0 for r in train_rows)
  assert result["num_pairs"] == 8 and os.path.exists(os.path.join(workdir, "eval.json"))
  config.data.data_dir = ""
  with pytest.raises(ValueError, match="needs --config.data.data_dir"):
    pipeline.data_dir_for(config, workdir)
