"""Downstream metrics (docs/method.md §6) as pure NumPy functions: arrays in, Python floats out.

  Med-VQA          vqa_accuracy (open / closed / overall), majority_answers (the baseline)
  classification   accuracy; roc_auc and mean_auc (multi-label, CheXpert-style missing labels)
  retrieval        recall_at_k (image->text and text->image R@k, one or several captions per image)
  reporting        markdown_table (the table `mpma-eval --suite` prints)

JAX arrays are accepted anywhere an array is (they are converted with np.asarray). Scores that are
not finite (a diverged model) make the metric NaN, never a perfect or chance figure.
"""
import math
from typing import Iterable, Optional, Sequence

import numpy as np


def _predicted_index(pred) -> tuple[np.ndarray, bool]:
  """(int [N], finite) from predicted indices [N] or float scores [N, C] (their argmax). finite is
  False (and the indices 0) when a float entry is not finite: the argmax of a NaN row is an
  arbitrary index, which would score as a prediction."""
  pred = np.asarray(pred)
  if not np.issubdtype(pred.dtype, np.integer):  # float, and bfloat16 (not a NumPy floating type)
    pred = pred.astype(np.float64)
    n = pred.shape[0] if pred.ndim == 2 else pred.size
    if not np.isfinite(pred).all():
      return np.zeros(n, np.int64), False
    if pred.ndim == 2:
      pred = pred.argmax(-1)
  return pred.astype(np.int64).reshape(-1), True


# --- Med-VQA -------------------------------------------------------------------------------------
def vqa_accuracy(pred, accepted, closed) -> dict:
  """Accuracy over all questions and per answer type.

  pred: int [N], the predicted answer index (a negative index = no prediction, counted wrong), or
    float answer scores [N, A] (the argmax is the prediction; any non-finite score: NaN accuracies).
  accepted: bool or float [N, A]; accepted[i, a] true (> 0) when answer a is correct for question
    i. Several alternatives may be accepted; a row of zeros (the true answer is not in the
    vocabulary, e.g. unseen in train under the clean protocol) makes the question count as wrong.
  closed: bool [N], true for closed (yes/no) questions, false for open ones.
  Returns {"open", "closed", "overall"}: fractions in [0, 1] (NaN for a group with no questions),
  and the counts {"n_open", "n_closed", "n"}.
  """
  pred, finite = _predicted_index(pred)  # [N]
  accepted = np.asarray(accepted)
  closed = np.asarray(closed).astype(bool).reshape(-1)  # [N]
  n = pred.shape[0]
  if accepted.ndim != 2 or accepted.shape[0] != n or closed.shape[0] != n:
    raise ValueError(f"vqa_accuracy needs pred [N], accepted [N, A], closed [N]; got "
                     f"{pred.shape}, {accepted.shape}, {closed.shape}")
  if n and pred.max() >= accepted.shape[1]:
    raise ValueError(f"predicted answer index {pred.max()} is outside the vocabulary of "
                     f"{accepted.shape[1]} answers")
  known = pred >= 0
  correct = np.zeros(n, bool)  # [N]
  correct[known] = accepted[np.nonzero(known)[0], pred[known]] > 0

  def mean(mask):
    return float(correct[mask].mean()) if mask.any() and finite else math.nan

  return {
      "open": mean(~closed), "closed": mean(closed), "overall": mean(np.ones(n, bool)),
      "n_open": int((~closed).sum()), "n_closed": int(closed.sum()), "n": int(n)
  }


def majority_answers(train_answer, train_closed, closed) -> np.ndarray:
  """The majority-answer baseline: pred int [N] for questions whose types are `closed` [N].

  Every closed question gets the answer index most frequent among the closed training questions,
  every open question the one most frequent among the open training questions (train_answer
  int [M], train_closed bool [M]). Unknown training answers (-1, or any negative index) never count;
  ties go to the smaller index. A type with no known training answer falls back to the majority
  over all training questions, and to -1 (no prediction, counted wrong) if there is none at all.
  """
  train_answer = np.asarray(train_answer).astype(np.int64).reshape(-1)  # [M]
  train_closed = np.asarray(train_closed).astype(bool).reshape(-1)  # [M]
  closed = np.asarray(closed).astype(bool).reshape(-1)  # [N]
  if train_answer.shape != train_closed.shape:
    raise ValueError(f"train_answer {train_answer.shape} and train_closed {train_closed.shape} "
                     f"must have the same shape [M]")

  def majority(mask) -> int:
    answers = train_answer[mask & (train_answer >= 0)]
    return int(np.argmax(np.bincount(answers))) if answers.size else -1  # argmax: first of ties

  overall = majority(np.ones_like(train_closed))
  by_type = {}
  for is_closed in (False, True):
    m = majority(train_closed == is_closed)
    by_type[is_closed] = overall if m < 0 else m
  return np.where(closed, by_type[True], by_type[False]).astype(np.int64)


# --- classification ------------------------------------------------------------------------------
def accuracy(pred, label) -> float:
  """Fraction of pred [N] equal to label [N] (class indices); pred may be float class scores
  [N, C] (argmax). NaN when N == 0 or a float pred entry is not finite."""
  index, finite = _predicted_index(pred)  # [N]
  label = np.asarray(label).reshape(-1)
  if index.shape != label.shape:
    raise ValueError(f"accuracy needs pred [N] (or scores [N, C]) and label [N]; got "
                     f"{np.shape(pred)}, {label.shape}")
  return float(np.mean(index == label)) if index.size and finite else math.nan


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x [N] in ascending order, tied values sharing their mean rank."""
  order = np.argsort(x, kind="stable")
  xs = x[order]
  # Start of each run of equal values in sorted order, and the run each position belongs to.
  starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # [R]
  ends = np.r_[starts[1:], x.size]  # [R], exclusive
  run = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1  # [N]
  ranks = np.empty(x.size)
  ranks[order] = (starts + ends + 1)[run] / 2.0  # mean of the 1-based ranks starts+1 .. ends
  return ranks


def roc_auc(scores, labels) -> float:
  """Area under the ROC curve: P(a random positive scores above a random negative), ties 1/2.

  scores [N] (higher = more positive); labels [N] in {0, 1} (booleans too). Computed from average
  ranks (Mann-Whitney U / (n_pos * n_neg)). NaN when the positives or the negatives are absent,
  or when a score is not finite.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels, np.float64).reshape(-1)
  if scores.shape != labels.shape:
    raise ValueError(f"roc_auc needs scores and labels of one shape [N]; got {scores.shape}, "
                     f"{labels.shape}")
  if not np.isin(labels, (0.0, 1.0)).all():
    raise ValueError(f"roc_auc labels must be 0 or 1, got {np.unique(labels)} (mean_auc ignores "
                     f"NaN / -1 entries)")
  if not np.isfinite(scores).all():
    return math.nan
  pos = labels == 1.0
  n_pos, n_neg = int(pos.sum()), int((~pos).sum())
  if n_pos == 0 or n_neg == 0:
    return math.nan
  u = _average_ranks(scores)[pos].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def mean_auc(scores, labels, names: Optional[Sequence[str]] = None) -> dict:
  """Per-class AUCs of scores [N, C] against labels [N, C], and their mean.

  Label entries other than 1 / 0 (NaN = not mentioned, -1 = uncertain) are left out of their
  class's AUC. Returns {name: auc} for every class (names[c], or "class_{c}" without names; NaN
  where a class lacks positives or negatives) plus "mean" over the classes whose AUC is defined
  (NaN if none is, or if any scored entry is not finite).
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, np.float64)
  if scores.ndim != 2 or scores.shape != labels.shape:
    raise ValueError(f"mean_auc needs scores and labels [N, C] of one shape; got {scores.shape}, "
                     f"{labels.shape}")
  c = scores.shape[1]
  names = [f"class_{i}" for i in range(c)] if names is None else list(names)
  if len(names) != c or "mean" in names or len(set(names)) != c:
    raise ValueError(f"mean_auc needs {c} distinct class names other than 'mean', got {names}")
  out, finite = {}, True
  for i, name in enumerate(names):
    keep = np.isin(labels[:, i], (0.0, 1.0))  # drops NaN and -1
    finite &= bool(np.isfinite(scores[keep, i]).all())
    out[name] = roc_auc(scores[keep, i], labels[keep, i])
  defined = [v for v in out.values() if not math.isnan(v)]
  out["mean"] = float(np.mean(defined)) if defined and finite else math.nan
  return out


# --- retrieval -----------------------------------------------------------------------------------
def recall_at_k(sim, ks: Iterable[int] = (1, 5, 10), positives=None) -> dict:
  """Image->text and text->image Recall@k: {"i2t_r1", ..., "t2i_r10"} as floats in [0, 1].

  sim: [N_images, N_texts] similarities (higher = closer). positives: bool [N_images, N_texts],
  default the identity (square sim, caption i belongs to image i); with several captions per
  image a query is a hit at k when ANY of its positives is among its top k. The rank of a query's
  best positive counts every non-positive candidate scoring at least as high (ties pessimistic:
  a constant matrix scores as badly as possible). Every image and every text needs a positive.
  Every recall is NaN when a similarity is not finite (NaN compares false, so a NaN query would
  otherwise rank its positive first).
  """
  sim = np.asarray(sim, np.float64)
  if sim.ndim != 2:
    raise ValueError(f"recall_at_k needs a 2-D similarity matrix [N_images, N_texts], got "
                     f"{sim.shape}")
  if positives is None:
    if sim.shape[0] != sim.shape[1]:
      raise ValueError(f"recall_at_k without `positives` needs a square similarity matrix (caption "
                       f"i of image i), got {sim.shape}")
    positives = np.eye(sim.shape[0], dtype=bool)
  positives = np.asarray(positives).astype(bool)
  if positives.shape != sim.shape:
    raise ValueError(f"positives {positives.shape} must have the shape of sim {sim.shape}")
  out = {}
  for name, s, p in (("i2t", sim, positives), ("t2i", sim.T, positives.T)):
    if not p.any(axis=1).all():
      raise ValueError(f"recall_at_k ({name}): {int((~p.any(axis=1)).sum())} queries have no "
                       f"positive")
    if not np.isfinite(s).all():
      out.update({f"{name}_r{k}": math.nan for k in ks})
      continue
    best = np.where(p, s, -np.inf).max(axis=1)  # [Q], score of the best positive
    rank = ((s >= best[:, None]) & ~p).sum(axis=1)  # [Q], 0 = a positive comes first
    for k in ks:
      out[f"{name}_r{k}"] = float(np.mean(rank < k))
  return out


# --- reporting -----------------------------------------------------------------------------------
def _is_number(v) -> bool:
  return isinstance(v,
                    (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _is_fraction(v) -> bool:
  return isinstance(v, (float, np.floating)) and (math.isnan(v) or 0.0 <= v <= 1.0)


def markdown_table(rows: list, columns: list, percent: Optional[Iterable[str]] = None) -> str:
  """A GitHub Markdown table: one line per dict in `rows`, one column per key in `columns`.

  A fraction metric (a column whose numbers are all floats in [0, 1], or the columns named in
  `percent` when given) prints as a percentage with one decimal without the sign (0.7705 -> 77.0);
  integers print as they are, other floats with 4 significant digits, strings as they are ('|'
  escaped). A missing key or None prints as '–', NaN as 'nan' (undefined, or a diverged model:
  never hidden as missing). Columns holding numbers are right-aligned.
  """
  def missing(v):
    return v is None or (_is_number(v) and math.isnan(v))

  values = {c: [r.get(c) for r in rows] for c in columns}
  if percent is None:
    fraction = {
        c for c in columns if any(_is_number(v) and not missing(v) for v in values[c]) and all(
            _is_fraction(v) for v in values[c] if _is_number(v))
    }
  else:
    fraction = set(percent)

  def fmt(c, v):
    if v is None:
      return "–"
    if missing(v):
      return "nan"
    if _is_number(v) and c in fraction:
      return f"{100.0 * float(v):.1f}"
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
      return str(int(v))
    if _is_number(v):
      return f"{float(v):.4g}"
    return str(v).replace("|", "\\|")

  numeric = {c for c in columns if any(_is_number(v) for v in values[c])}
  lines = [
      "| " + " | ".join(str(c).replace("|", "\\|") for c in columns) + " |",
      "|" + "|".join(" ---: " if c in numeric else " --- " for c in columns) + "|"
  ]
  for i in range(len(rows)):
    lines.append("| " + " | ".join(fmt(c, values[c][i]) for c in columns) + " |")
  return "\n".join(lines)
