"""The downstream tasks, one row each: what a task reads from a record, which head it puts on the
pre-trained model, its loss, its metrics, the metric that selects the checkpoint, the number of
outputs and the batch fields. Fine-tuning, mpma-eval, the suite, the fine-tuning model
(models/heads.py builds the head this table names) and the record decoding (data/downstream.py)
read it; nothing else branches on a task's name."""
import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpma_jax import losses, metrics
from mpma_jax.data import text as texts


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


# --- the label fields of a decoded example, from a record (decode: the data.downstream.Decode) ---
def _vqa_targets(decode, record) -> dict:
  accepted = np.zeros(max(len(decode.vocab), 1), np.float32)  # [A]
  for answer in texts.accepted_answers(record["answer"]):
    if answer in decode.vocab:
      accepted[decode.vocab[answer]] = 1.0
  return {
      "accepted": accepted, "closed": np.int32(texts.record_str(record["answer_type"]) == "closed")
  }


def _classification_targets(decode, record) -> dict:
  return {"label": np.int32(record["label"])}


def _image_classification_targets(decode, record) -> dict:
  targets, mask = decode.targets(np.asarray(record["labels"], np.float32))  # [C], [C]
  return {"targets": targets, "target_mask": mask}


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
  # models/heads.py: "joint" (fused [CLS] pair -> MLP), "image" (image encoder [CLS] -> linear),
  # "alignment" (no new head: GLA global embeddings, ITM for re-ranking)
  head: str
  text_field: str  # the record field the text comes from ("texts": the first of a list)
  targets: Callable  # (Decode, record) -> the task's label fields of a decoded example
  output_bias: Callable = lambda num_outputs: 0.0  # initial head bias (models/heads.JointHead)
  # records sharing a value of this field share an image: held-out validation takes whole images
  # and decoded images are cached by it (VQA: many questions per image)
  image_group: Optional[str] = None
  answers: bool = False  # outputs are an answer vocabulary (VQA: majority-answer baseline)
  label_columns: bool = False  # targets are the dataset's class columns named in data.labels
  other_train_dataset: bool = False  # trains on config.data.train_dataset (ROCO retrieval)


TASKS = {
    t.name: t for t in (
        Task(
            "vqa",
            _vqa_loss,
            _vqa_score,
            "overall",
            num_outputs=lambda config, vocab, names: len(vocab),
            batch_fields=lambda b, n:
            {"accepted": np.zeros((b, n), np.float32), "closed": np.zeros((b,), np.int32)},
            head="joint",
            text_field="question",
            targets=_vqa_targets,
            # binary cross-entropy per answer: biases start at logit(1/C)
            output_bias=lambda n: -math.log(max(n - 1, 1)),
            image_group="image_id",
            answers=True),
        Task("classification", _classification_loss, _classification_score, "accuracy",
             num_outputs=lambda config, vocab, names: len(names),
             batch_fields=lambda b, n: {"label": np.zeros((b,), np.int32)}, head="joint",
             text_field="text", targets=_classification_targets),
        Task(
            "image_classification", _image_classification_loss, _image_classification_score, "mean",
            num_outputs=lambda config, vocab, names: len(config.data.labels),
            batch_fields=lambda b, n:
            {"targets": np.zeros((b, n), np.float32), "target_mask": np.ones(
                (b, n), np.float32)}, head="image", text_field="text",
            targets=_image_classification_targets, label_columns=True),
        Task("retrieval", _retrieval_loss, _retrieval_score, "rsum", num_outputs=lambda config,
             vocab, names: 0, batch_fields=lambda b, n: {}, head="alignment", text_field="texts",
             targets=lambda decode, record: {}, other_train_dataset=True),
    )
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"task {name!r} is not one of {', '.join(TASKS)}")
  return TASKS[name]


def loss(name: str, out, batch) -> jax.Array:
  return get(name).loss(out, batch)
