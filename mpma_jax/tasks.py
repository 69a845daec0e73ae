"""The downstream tasks, one row each: the loss, the metrics, the metric that selects the
checkpoint, the number of outputs and the batch fields of the task (fine-tuning, mpma-eval, the
suite). The model's heads (models/heads.py) and the record decoding (data/downstream.py) follow
the same task names."""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpma_jax import losses, metrics


def _masked_mean(per_row, valid):
  return (per_row * valid).sum() / jnp.maximum(valid.sum(), 1)


def _vqa_loss(out, batch):  # binary cross-entropy against the accepted answers, summed [M3AE]
  valid = batch["valid"].astype(jnp.float32)  # [B]
  return _masked_mean(optax.sigmoid_binary_cross_entropy(out, batch["accepted"]).sum(-1), valid)


def _classification_loss(out, batch):
  valid = batch["valid"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(out, jnp.maximum(batch["label"], 0))
  return _masked_mean(ce, valid)


def _image_classification_loss(out, batch):  # binary cross-entropy over the scored labels
  mask = batch["target_mask"] * batch["valid"].astype(jnp.float32)[:, None]  # [B, C]
  bce = optax.sigmoid_binary_cross_entropy(out, batch["targets"])
  return (bce * mask).sum() / jnp.maximum(mask.sum(), 1)


def _retrieval_loss(out, batch):  # symmetric InfoNCE of the GLA global embeddings over the batch
  del batch
  return losses.global_alignment_loss(out["image"], out["text"], out["temperature"])


def _vqa_score(p, class_names):
  return metrics.vqa_accuracy(p["out"], p["accepted"], p["closed"].astype(bool))


def _classification_score(p, class_names):
  return {"accuracy": metrics.accuracy(p["out"], p["label"]), "n": len(p["label"])}


def _image_classification_score(p, class_names):
  labels = np.where(p["target_mask"] > 0, p["targets"], np.nan)
  return {**metrics.mean_auc(p["out"], labels, list(class_names)), "n": len(labels)}


def _retrieval_score(p, class_names):
  recall = metrics.recall_at_k(p["emb_image"] @ p["emb_text"].T)
  return {**recall, "rsum": float(sum(recall.values())), "n": len(p["emb_image"])}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  loss: Callable  # (model outputs, batch) -> mean loss over the valid rows (float32)
  score: Callable  # (predict_split rows, class names) -> metrics (fractions; NaN if not finite)
  select_metric: str  # the checkpoint with the highest value on the selection split is kept
  num_outputs: Callable  # (config, answer vocabulary, class names) -> head outputs
  batch_fields: Callable  # (batch size, num_outputs) -> the task's own fields, as zeros
  other_train_dataset: bool = False  # trains on config.data.train_dataset (ROCO retrieval)


TASKS = {
    t.name: t for t in (
        Task(
            "vqa", _vqa_loss, _vqa_score, "overall", lambda config, vocab, names: len(vocab), lambda
            b, n: {"accepted": np.zeros((b, n), np.float32), "closed": np.zeros((b,), np.int32)}),
        Task("classification", _classification_loss, _classification_score, "accuracy", lambda
             config, vocab, names: len(names), lambda b, n: {"label": np.zeros((b,), np.int32)}),
        Task(
            "image_classification", _image_classification_loss, _image_classification_score, "mean",
            lambda config, vocab, names: len(config.data.labels), lambda b, n:
            {"targets": np.zeros((b, n), np.float32), "target_mask": np.ones((b, n), np.float32)}),
        Task("retrieval", _retrieval_loss, _retrieval_score, "rsum", lambda config, vocab, names: 0,
             lambda b, n: {}, other_train_dataset=True),
    )
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"task {name!r} is not one of {', '.join(TASKS)}")
  return TASKS[name]


def loss(name: str, out, batch) -> jax.Array:
  return get(name).loss(out, batch)
