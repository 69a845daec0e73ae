"""Downstream metrics against hand-computed values."""
import json
import math

import numpy as np
import pytest

from mpma_jax import metrics, retrieval, tasks


# --- Med-VQA ---------------------------------------------------------------------------------------
def test_vqa_accuracy_by_type():
  accepted = np.zeros((6, 4), bool)  # [N, A]
  accepted[0, 0] = True  # closed, right
  accepted[1, 1] = True  # closed, wrong (pred 0)
  accepted[2, [2, 3]] = True  # open, two accepted alternatives, pred the second: right
  #                                   row 3: open, answer unseen in the vocabulary: always wrong
  accepted[4, 2] = True  # open, right
  accepted[5, 1] = True  # closed, no prediction (-1): wrong
  pred = np.array([0, 0, 3, 2, 2, -1])
  closed = np.array([True, True, False, False, False, True])
  got = metrics.vqa_accuracy(pred, accepted, closed)
  assert got == {
      "open": pytest.approx(2 / 3), "closed": pytest.approx(1 / 3), "overall": 0.5, "n_open": 3,
      "n_closed": 3, "n": 6
  }
  assert all(isinstance(got[k], float) for k in ("open", "closed", "overall"))
  # Float (soft) targets: any score > 0 is accepted.
  soft = metrics.vqa_accuracy([1, 0], [[0.0, 0.3], [0.0, 1.0]], [False, False])
  assert soft["open"] == 0.5 and math.isnan(soft["closed"]) and soft["n_closed"] == 0


def test_vqa_accuracy_rejects_bad_shapes_and_indices():
  with pytest.raises(ValueError, match="outside the vocabulary"):
    metrics.vqa_accuracy([4], np.ones((1, 4)), [True])
  with pytest.raises(ValueError, match="accepted"):
    metrics.vqa_accuracy([0, 1], np.ones((3, 4)), [True, False])


def test_majority_answers_per_type_ties_and_unknown():
  # Closed known answers: 2, 2, 1, 1, 0 -> tie 1 vs 2 -> 1 (smaller); -1 is the most frequent
  # entry of all but never counts. Open: 3.
  train_answer = [2, 2, 1, 1, 0, -1, -1, -1, 3, 3, 3]
  train_closed = [True] * 8 + [False] * 3
  pred = metrics.majority_answers(train_answer, train_closed, [True, False, True])
  assert pred.tolist() == [1, 3, 1] and pred.dtype == np.int64
  # No known open answer: open questions fall back to the overall majority; nothing known: -1.
  assert metrics.majority_answers([0, -1], [True, False], [False]).tolist() == [0]
  assert metrics.majority_answers([-1, -1], [True, False], [False, True]).tolist() == [-1, -1]


def test_majority_baseline_scored_with_vqa_accuracy():
  pred = metrics.majority_answers([0, 0, 1, 2], [True, True, True, False], [True, True, False])
  accepted = np.eye(3, dtype=bool)[[0, 1, 2]]  # true answers 0, 1, 2
  got = metrics.vqa_accuracy(pred, accepted, [True, True, False])
  assert (got["closed"], got["open"], got["overall"]) == (0.5, 1.0, pytest.approx(2 / 3))


# --- classification --------------------------------------------------------------------------------
def test_accuracy():
  assert metrics.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
  assert math.isnan(metrics.accuracy([], []))
  with pytest.raises(ValueError):
    metrics.accuracy([0, 1], [0])


def test_average_ranks():
  assert metrics._average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4, 1, 4, 2, 4]


def test_roc_auc_hand_computed():
  # Pairs (pos, neg): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
  assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
  # A positive tied with a negative counts 1/2: (1 + 0.5 + 1 + 1) / 4.
  assert metrics.roc_auc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == 0.875
  assert metrics.roc_auc([0.5] * 4, [0, 1, 0, 1]) == 0.5  # all tied
  assert metrics.roc_auc([0.9, 0.1], [False, True]) == 0.0  # booleans; perfectly inverted
  # Order of the examples does not matter.
  assert metrics.roc_auc([0.8, 0.35, 0.4, 0.1], [1, 1, 0, 0]) == 0.75


def test_roc_auc_one_class_is_nan_and_bad_labels_raise():
  assert math.isnan(metrics.roc_auc([0.1, 0.2], [1, 1]))
  assert math.isnan(metrics.roc_auc([0.1, 0.2], [0, 0]))
  with pytest.raises(ValueError, match="0 or 1"):
    metrics.roc_auc([0.1, 0.2], [1, -1])


def test_mean_auc_ignores_missing_and_uncertain_labels():
  scores = np.array([[0.1, 0.9, 0.3], [0.4, 0.2, 0.4], [0.35, 0.3, 0.5], [0.8, 0.7, 0.1],
                     [0.6, 0.5, 0.2]])
  nan = np.nan
  labels = np.array([[0, 1, 1], [0, 0, nan], [1, -1, 1], [1, 1, -1], [nan, 0, 1]])
  # Column 0 without row 4: the 0.75 case above (with row 4 as a negative it would be 0.5).
  # Column 1 without row 2: positives 0.9, 0.7 above negatives 0.2, 0.5 -> 1.0.
  # Column 2: only positives are left -> NaN, left out of the mean.
  got = metrics.mean_auc(scores, labels, names=["lesion", "edema", "other"])
  assert set(got) == {"lesion", "edema", "other", "mean"}
  assert got["lesion"] == 0.75 and got["edema"] == 1.0 and math.isnan(got["other"])
  assert got["mean"] == 0.875
  assert set(metrics.mean_auc(scores, labels)) == {"class_0", "class_1", "class_2", "mean"}
  assert math.isnan(metrics.mean_auc(scores[:, 2:], labels[:, 2:])["mean"])
  with pytest.raises(ValueError, match="names"):
    metrics.mean_auc(scores, labels, names=["a", "b"])


# --- retrieval -------------------------------------------------------------------------------------
def test_recall_at_k_identity_matches_losses():
  # Rank of the positive per row: 0, 1, 2, 0 (i2t); per column: 0, 1, 0, 1 (t2i).
  sim = np.array([[0.9, 0.1, 0.2, 0.0], [0.8, 0.5, 0.1, 0.0], [0.1, 0.6, 0.3, 0.7],
                  [0.0, 0.2, 0.1, 0.4]])
  r = metrics.recall_at_k(sim, ks=(1, 2, 3))
  assert r == {
      "i2t_r1": 0.5, "i2t_r2": 0.75, "i2t_r3": 1.0, "t2i_r1": 0.5, "t2i_r2": 1.0, "t2i_r3": 1.0
  }
  assert retrieval.recall(sim, ks=(1, 2, 3)) == r  # one implementation
  sim = np.random.default_rng(0).normal(size=(9, 9)).round(1)  # rounded: many ties
  assert retrieval.recall(sim) == metrics.recall_at_k(sim)


def test_recall_at_k_ties_are_pessimistic():
  assert metrics.recall_at_k(np.ones((5, 5)), ks=(1, 4, 5)) == {
      "i2t_r1": 0.0, "i2t_r4": 0.0, "i2t_r5": 1.0, "t2i_r1": 0.0, "t2i_r4": 0.0, "t2i_r5": 1.0
  }


def test_recall_at_k_several_captions_per_image():
  # Image 0 has captions 0, 1; image 1 has captions 2, 3.
  sim = np.array([[0.9, 0.1, 0.8, 0.2], [0.7, 0.3, 0.4, 0.6]])
  pos = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
  r = metrics.recall_at_k(sim, ks=(1, 2), positives=pos)
  # i2t: image 0's best caption (0.9) is first; image 1's best (0.6) is behind caption 0 (0.7).
  # t2i: captions 0..3 rank their image 0, 1, 1, 0 (0.1 < 0.3, 0.4 < 0.8).
  assert r == {"i2t_r1": 0.5, "i2t_r2": 1.0, "t2i_r1": 0.5, "t2i_r2": 1.0}
  # Positives tied with each other do not push each other down; a tied negative does.
  sim = np.array([[0.5, 0.5, 0.5], [0.1, 0.2, 0.9]])
  pos = np.array([[1, 1, 0], [0, 0, 1]], bool)
  r = metrics.recall_at_k(sim, ks=(1, 2), positives=pos)
  assert r == {"i2t_r1": 0.5, "i2t_r2": 1.0, "t2i_r1": 1.0, "t2i_r2": 1.0}


def test_recall_at_k_checks_shapes():
  with pytest.raises(ValueError, match="square"):
    metrics.recall_at_k(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="no positive"):
    metrics.recall_at_k(np.zeros((2, 3)), positives=np.array([[1, 1, 0], [0, 0, 0]], bool))


# --- reporting -------------------------------------------------------------------------------------
def test_markdown_table_exact():
  rows = [{"task": "VQA-RAD", "open": 0.6723, "closed": 0.835, "n": 451},
          {"task": "SLAKE | en", "open": float("nan"), "n": np.int64(1061)}]
  assert metrics.markdown_table(
      rows, ["task", "open", "closed", "n", "note"]) == ("| task | open | closed | n | note |\n"
                                                         "| --- | ---: | ---: | ---: | --- |\n"
                                                         "| VQA-RAD | 67.2 | 83.5 | 451 | – |\n"
                                                         "| SLAKE \\| en | nan | – | 1061 | – |")


def test_markdown_table_non_fraction_floats_and_override():
  rows = [{"loss": 2.3456, "auc": np.float32(0.5)}, {"loss": 0.5, "auc": 1.0}]
  assert metrics.markdown_table(
      rows,
      ["loss", "auc"]) == ("| loss | auc |\n| ---: | ---: |\n| 2.346 | 50.0 |\n| 0.5 | 100.0 |")
  assert metrics.markdown_table(rows[1:], ["loss", "auc"],
                                percent=["auc"]).endswith("| 0.5 | 100.0 |")


# --- a diverged model ------------------------------------------------------------------------------
@pytest.mark.faults
def test_metrics_of_non_finite_scores_are_nan_never_perfect():
  """NaN compares false: a NaN similarity once ranked every positive first (100 % recall), and
  the argmax of NaN logits picked an arbitrary class. Every metric is NaN instead."""
  emb = np.full((6, 4), np.nan)  # the embeddings of a model whose parameters are NaN
  for sim in (emb @ emb.T, np.where(np.eye(6), np.inf, 0.0)):
    r = metrics.recall_at_k(sim)
    assert set(r) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(math.isnan(v) for v in r.values()), r
    assert all(math.isnan(v) for v in retrieval.recall(sim).values())
  pos = np.array([[1, 1, 0], [0, 0, 1]], bool)
  assert math.isnan(metrics.recall_at_k(np.full((2, 3), np.nan), ks=(1,), positives=pos)["t2i_r1"])

  logits = np.array([[np.nan, 0.0], [1.0, 0.0], [0.0, 1.0]])  # [N, C]; one row diverged
  assert metrics.accuracy(np.nan_to_num(logits), [0, 0, 1]) == 1.0  # scores: their argmax
  assert math.isnan(metrics.accuracy(logits, [0, 0, 1]))
  assert math.isnan(metrics.accuracy(np.array([0.0, np.inf]), [0, 1]))
  vqa = metrics.vqa_accuracy(logits, np.eye(3, 2, dtype=bool), [True, True, False])
  assert all(math.isnan(vqa[k]) for k in ("open", "closed", "overall")) and vqa["n"] == 3
  assert math.isnan(metrics.roc_auc([0.1, np.nan, 0.3], [0, 1, 1]))
  assert math.isnan(metrics.roc_auc([np.inf, np.inf, np.inf], [0, 1, 1]))  # once 0.5
  got = metrics.mean_auc(np.array([[0.1, np.nan], [0.9, 0.5]]), np.array([[0, 1], [1, 0]]))
  assert got["class_0"] == 1.0 and math.isnan(got["class_1"]) and math.isnan(got["mean"])

  # Fine-tuning's scores and mpma-eval's rows (tasks.Task.score) carry the NaN.
  nan_out = np.full((3, 2), np.nan, np.float32)
  assert math.isnan(
      tasks.get("classification").score({"out": nan_out, "label": [0, 1, 1]}, ())["accuracy"])
  roco = tasks.get("retrieval").score({"emb_image": emb, "emb_text": emb}, ())
  assert math.isnan(roco["i2t_r1"]) and math.isnan(roco["rsum"])


@pytest.mark.faults
def test_nan_retrieval_shows_as_nan_in_eval_json_and_the_tables():
  """Pre-training's end-of-run retrieval of a NaN model: NaN in eval.json (as the JSON NaN that
  Python reads back), 'nan' in the summary table and the suite's Markdown table."""
  nan_embed = lambda params, image, ids, mask: (np.full((len(image), 4), np.nan),) * 2
  pairs = {"image": np.zeros((8, 1)), "text_ids": np.zeros((8, 1)), "text_mask": np.zeros((8, 1))}
  trained = retrieval.evaluate(nan_embed, None, pairs, batch_size=4)
  written = json.loads(json.dumps({"trained": trained}))["trained"]  # eval.json's "trained"
  assert all(math.isnan(v) for v in written.values())
  table = retrieval.format_table({"trained": trained, "chance": retrieval.chance(8)})
  assert table.splitlines()[1].split() == ["trained"] + ["nan"] * 6
  assert "100.00" not in table.splitlines()[1]
  md = metrics.markdown_table([{"task": "roco", **trained}], ["task", "i2t_r1"])
  assert md.splitlines()[-1] == "| roco | nan |"
