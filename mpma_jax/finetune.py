"""Fine-tuning (mpma-finetune): a pre-trained MPMA trained and tested on a downstream task
(docs/method.md §6) under each protocol in `config.protocols` (data/downstream.py: `prior` as in
M3AE-style work, `clean` without peeking at test). Read top to bottom: the pre-trained model ->
the optimizer (M3AE's groups) -> the jit-compiled train and predict steps (sharded like
pre-training: `config.mesh`; each task's loss and metrics are in tasks.py) -> `run_protocol`
(train, select on validation every epoch, test once) -> `finetune` (all protocols, results.json).

A run writes <workdir>/config.json, and per protocol <workdir>/<protocol>/: checkpoints/<epoch>/
(Orbax, the best by validation kept), plan.json (which records trained / selected / tested, and the
notes), vocab.json (VQA), results.json (validation history, test metrics, the majority baseline),
plus tb/ and metrics.jsonl.
"""
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mpma_jax import checkpoint, logger, metrics, optim, sharding, tasks, train, visualize
from mpma_jax.data import downstream
from mpma_jax.data import text as texts
from mpma_jax.data import tokenizer as tokenizers
from mpma_jax.models import text as text_model
from mpma_jax.models import vit
from mpma_jax.models.heads import Downstream


# --- the pre-trained model -----------------------------------------------------------------------
def model_config(config: ml_collections.ConfigDict, pre_model: ml_collections.ConfigDict):
  """The pre-training model config with the fine-tuning overrides (image size, dtype, remat)."""
  m = ml_collections.ConfigDict(pre_model.to_dict())
  if config.image_size:
    m.image.size = config.image_size
  if config.model_dtype:
    m.dtype = config.model_dtype
  if config.remat:
    m.remat = config.remat
  if m.image.size % m.image.patch:
    raise ValueError(f"image_size={m.image.size} is not a multiple of the patch size "
                     f"{m.image.patch}")
  longest = text_model.longest_text(m.text.max_positions, m.text.position_style, m.text.pad_id)
  if config.data.max_len > longest:
    raise ValueError(f"data.max_len={config.data.max_len} is longer than the pre-trained text "
                     f"encoder reads: its {m.text.max_positions} {m.text.position_style} "
                     f"positions take at most {longest} tokens; set data.max_len <= {longest}")
  return m


def transfer(fresh: Any, pretrained: Any, model: ml_collections.ConfigDict) -> tuple[Any, list]:
  """Every leaf of fresh['mpma'] taken from the pre-trained parameters (the image position
  embedding resized to model.image.size); the head keeps its initialisation. Returns (params as
  host arrays, notes)."""
  flat_new = {k: v for k, v in _flatten(fresh["mpma"]).items()}
  flat_old = _flatten(pretrained)
  notes, out = [], {}
  for key, value in flat_new.items():
    if key not in flat_old:
      raise KeyError(f"the pre-trained checkpoint has no parameter {'/'.join(key)} (shape "
                     f"{value.shape}); was it written by an older mpma-jax?")
    old = np.asarray(flat_old[key], np.float32)
    if key[-2:] == ("image_encoder", "position_embedding") and old.shape != value.shape:
      old = np.asarray(
          vit.resize_pos_embed(old, model.image.size // model.image.patch,
                               model.image.get("pos_resize", "jax_bicubic")))
      notes.append(f"{'/'.join(key)} resized from {flat_old[key].shape} to {old.shape}")
    if old.shape != value.shape:
      raise ValueError(f"parameter {'/'.join(key)}: checkpoint shape {old.shape}, model shape "
                       f"{value.shape}")
    out[key] = old
  return {**fresh, "mpma": _unflatten(out)}, notes


def _flatten(tree, prefix=()) -> dict:
  if isinstance(tree, dict) or hasattr(tree, "items"):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def _unflatten(flat: dict) -> dict:
  out = {}
  for key, value in flat.items():
    node = out
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = value
  return out


# --- optimizer ------------------------------------------------------------------------------------
def param_groups(params: Any, config: ml_collections.ConfigDict) -> Any:
  """'head' (new task head), 'encoder' (config.optim.encoder_modules) or 'fusion' (every other
  pre-trained module: projections, memory, co-attention, poolers, GLA) per leaf; with
  linear_probe everything but the head is 'frozen'."""
  encoders = set(config.optim.encoder_modules)

  def group(path, _):
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names[0] == "head":
      return "head"
    if config.linear_probe:
      return "frozen"
    return "encoder" if names[1] in encoders else "fusion"

  return jax.tree_util.tree_map_with_path(group, params)


def make_optimizer(config: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  """optim.adamw at optim.lr for the encoders, x fusion_mult for the rest of the pre-trained model,
  x head_mult for the head [M3AE]; nothing for the frozen part of a linear probe."""
  o = config.optim
  return optim.adamw(o, steps, lambda params: param_groups(params, config),
                     {"encoder": 1.0, "fusion": o.fusion_mult, "head": o.head_mult, "frozen": None})


# --- steps ----------------------------------------------------------------------------------------
def build_model(config, model_cfg, num_outputs: int) -> Downstream:
  task = tasks.get(config.task)
  if config.get("head_output_bias", "prior") not in ("prior", "zero"):
    raise ValueError(f"head_output_bias must be prior or zero, got {config.head_output_bias!r}")
  bias = task.output_bias(num_outputs) if config.get("head_output_bias",
                                                     "prior") == "prior" else 0.0
  return Downstream(ml_collections.FrozenConfigDict(model_cfg), task.head, num_outputs, bias,
                    config.linear_probe)


def dummy_batch(config, model_cfg, num_outputs: int, batch_size: int = 2) -> dict:
  s, length = model_cfg.image.size, config.data.max_len
  batch = {
      "image": np.zeros((batch_size, s, s, 3), np.uint8), "text_ids": np.zeros(
          (batch_size, length), np.int32), "text_mask": np.ones((batch_size, length), np.int32),
      "valid": np.ones((batch_size,), np.int32)
  }
  batch.update(tasks.get(config.task).batch_fields(batch_size, num_outputs))
  return batch


def init_state(config, model: Downstream, model_cfg, num_outputs, pretrained, tx, mesh, rules):
  """(params, opt_state, shardings of both, notes): the head freshly initialised, the rest from
  the pre-trained parameters, placed directly in their shardings."""
  batch = dummy_batch(config, model_cfg, num_outputs)
  init = lambda: model.init(jax.random.key(config.seed), batch, method=Downstream.init_all)["params"
                                                                                           ]
  boxed = jax.eval_shape(init)
  param_sh = sharding.logical_shardings(boxed, mesh, rules)
  # Only the head keeps fresh values (`transfer` replaces every other leaf), so only the head is
  # computed: compiling the initialisation of the whole model cost as much as the train step.
  fresh = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                       is_leaf=lambda x: isinstance(x, nn.Partitioned))  # shapes
  if "head" in fresh:
    fresh["head"] = jax.device_get(
        jax.jit(lambda: nn.meta.unbox(init()["head"]), out_shardings=param_sh["head"])())
  host, notes = transfer(fresh, pretrained, model_cfg)

  def place(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  params = jax.tree.map(place, host, param_sh)
  opt_state = jax.jit(tx.init)(params)  # moments laid out like the parameters
  return params, opt_state, param_sh, notes


def make_train_step(config, model: Downstream, tx, param_sh, mesh):
  """jit (params, opt_state, batch, step) -> (params, opt_state, loss, nonfinite). A step whose
  loss, gradient, new parameters or new optimizer state is not finite changes nothing
  (nonfinite = 1), as in pre-training (train.make_train_step)."""
  def step_fn(params, opt_state, batch, step):
    rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)

    def loss_fn(p):
      out = model.apply({"params": p}, batch, deterministic=False, rngs={"dropout": rng})
      return tasks.loss(config.task, out, batch)

    loss, grads = jax.value_and_grad(loss_fn)(params)

    def apply(_):
      updates, new_opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_opt_state

    # The check runs on its own copy of the update, the kept one in place inside the cond (see
    # train.make_train_step).
    finite = jnp.isfinite(loss) & checkpoint.all_finite(apply(None))
    params, opt_state = jax.lax.cond(finite, apply, lambda _: (params, opt_state), None)
    return params, opt_state, loss, 1 - finite.astype(jnp.int32)

  return jax.jit(step_fn, in_shardings=(param_sh, None, sharding.batch_sharding(mesh), None),
                 out_shardings=(param_sh, None, None, None), donate_argnums=(0, 1))


def make_predict(model: Downstream, mesh):
  """jit (params, batch) -> the model's outputs, replicated (every host reads all of them)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda params, batch: model.apply({"params": params}, batch),
                 out_shardings=replicated)


def device_batch(batch: dict, mesh) -> dict:
  """A full batch that every host holds -> global arrays split over the batch axes."""
  s = sharding.batch_sharding(mesh)
  return {k: jax.device_put(np.asarray(v), s) for k, v in batch.items()}


# --- scoring --------------------------------------------------------------------------------------
def predict_split(config, predict, params, batches, mesh, keep_inputs: bool = False) -> dict:
  """Runs the model over eval batches; returns the valid rows' outputs and targets (and with
  keep_inputs the images and texts) as numpy."""
  keep = ("valid", "accepted", "closed", "label", "targets", "target_mask", "index")
  keep += ("image", "text_ids", "text_mask") if keep_inputs else ()
  rows: dict[str, list] = {}
  for batch in batches:
    out = jax.device_get(predict(params, device_batch(batch, mesh)))
    valid = batch["valid"].astype(bool)
    if isinstance(out, dict):
      for k in ("image", "text"):
        rows.setdefault(f"emb_{k}", []).append(np.asarray(out[k])[valid])
    else:
      rows.setdefault("out", []).append(np.asarray(out)[valid])
    for k in keep:
      if k in batch:
        rows.setdefault(k, []).append(batch[k][valid])
  return {k: np.concatenate(v) for k, v in rows.items()}


def itm_rerank(config, model: Downstream, params, rows: dict, mesh) -> dict:
  """Retrieval recall after re-ordering each query's top-k (GLA global similarity) by the ITM
  head's match probability; the rest of the ranking is unchanged."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  itm = jax.jit(lambda p, b: model.apply({"params": p}, b, method=Downstream.itm_scores),
                out_shardings=replicated)
  sim = rows["emb_image"] @ rows["emb_text"].T  # [N images, N texts]
  n, k, size = len(sim), min(config.retrieval.rerank_k, len(sim)), config.eval.batch_size
  out = {}
  for direction, s in (("i2t", sim), ("t2i", sim.T)):  # rows = queries
    candidates = np.argsort(-s, axis=1, kind="stable")[:, :k]  # [N, k]
    query, cand = np.repeat(np.arange(n), k), candidates.reshape(-1)
    image, text = (query, cand) if direction == "i2t" else (cand, query)
    probs = []
    for start in range(0, len(query), size):
      i, t = image[start:start + size], text[start:start + size]
      pad = size - len(i)
      i, t = np.pad(i, (0, pad)), np.pad(t, (0, pad))
      batch = {
          "image": rows["image"][i], "text_ids": rows["text_ids"][t], "text_mask": rows["text_mask"]
                                                                                   [t]
      }
      probs.append(np.asarray(jax.device_get(itm(params, device_batch(batch, mesh))))[:size - pad])
    reranked = s.copy()
    reranked[query, cand] = 2.0 + np.concatenate(probs)  # above every cosine similarity
    recall = metrics.recall_at_k(reranked if direction == "i2t" else reranked.T)
    out.update({key: v for key, v in recall.items() if key.startswith(direction)})
  return {**out, "rsum": float(sum(out.values())), "rerank_k": k, "n": n}


def pictures(config, model_cfg, params, test_rows: dict, tokenizer_dir: str, workdir: str,
             step: int) -> list[str]:
  """PNGs (and TensorBoard images) of a fine-tuning run: its loss curve, and for retrieval the
  test queries' top-5 images. Returns the paths."""
  out, paths, images = os.path.join(workdir, "pictures"), [], {}
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if config.train.epochs and os.path.exists(metrics_path):
    paths.append(os.path.join(out, "curves.png"))
    images["curves"] = visualize.training_curves(metrics_path, paths[-1])
  if tasks.get(config.task).head == "alignment" and "image" in test_rows:
    tok = tokenizers.load_tokenizer(tokenizer_dir)
    n = min(100, len(test_rows["image"]))
    pairs = {k: test_rows[k][:n] for k in ("image", "text_ids", "text_mask")}
    paths.append(os.path.join(out, "retrieval.png"))
    images["retrieval"] = visualize.retrieval_examples(model_cfg, jax.device_get(params["mpma"]),
                                                       pairs, tok, paths[-1])
  if images:
    visualize.to_tensorboard(os.path.join(workdir, "tb"), images, step)
  return paths


def majority_baseline(builder, plan: downstream.Plan, test: dict) -> dict:
  """VQA accuracy of answering every question with the most frequent training answer of its type
  (closed / open), measured on the same test rows as the model."""
  vocab = {a: i for i, a in enumerate(plan.vocab)}
  source = builder.as_data_source("train")
  answers, closed = [], []
  for i in plan.train[1]:
    record = source[int(i)]
    first = [vocab[a] for a in texts.accepted_answers(record["answer"]) if a in vocab]
    answers.append(first[0] if first else -1)
    closed.append(texts.record_str(record["answer_type"]) == "closed")
  pred = metrics.majority_answers(np.array(answers), np.array(closed), test["closed"].astype(bool))
  return metrics.vqa_accuracy(pred, test["accepted"], test["closed"].astype(bool))


# --- one protocol ---------------------------------------------------------------------------------
def run_protocol(config, protocol: str, pre_config, pretrained, tokenizer_dir: str, workdir: str,
                 log_print=print) -> dict:
  """Trains under one protocol, keeps the best checkpoint by validation, tests it once."""
  os.makedirs(workdir, exist_ok=True)
  builder = downstream.open_builder(config.dataset, config.data_dir)
  plan = downstream.plan(builder, config, protocol)
  source = {
      role: builder if name == config.dataset else downstream.open_builder(name, config.data_dir)
      for role, name in plan.datasets.items()
  }
  class_names = list(builder.info.metadata.get("class_names", ()))
  task = tasks.get(config.task)
  num_outputs = task.num_outputs(config, plan.vocab, class_names)
  model_cfg = model_config(config, pre_config.model)
  decode = downstream.decoder(config, builder, tokenizer_dir, model_cfg.image.size, plan.vocab)
  train_split, train_idx = plan.train
  batch_size = config.train.batch_size
  if config.train.epochs and len(train_idx) < batch_size:
    raise ValueError(f"{len(train_idx)} training records < train.batch_size={batch_size}")
  steps_per_epoch = len(train_idx) // batch_size
  total_steps = max(config.train.epochs * steps_per_epoch, 1)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "plan.json"), "w") as f:
      json.dump(
          {
              "protocol": protocol, "notes": plan.notes, **{
                  role: {
                      "split": s, "num": len(i), "indices": i.tolist()
                  } for role, (s, i) in (("train", plan.train), ("select", plan.select), ("test", plan.test))
              }
          }, f)
    if plan.vocab:
      with open(os.path.join(workdir, "vocab.json"), "w") as f:
        json.dump(plan.vocab, f)
  for note in plan.notes:
    log_print(f"[{protocol}] {note}")

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.mesh)
  model = build_model(config, model_cfg, num_outputs)
  tx = make_optimizer(config, total_steps)
  log = logger.Logger(workdir)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, opt_state, param_sh, notes = init_state(config, model, model_cfg, num_outputs,
                                                    pretrained, tx, mesh, rules)
    for note in notes:
      log_print(f"[{protocol}] {note}")
    train_step = make_train_step(config, model, tx, param_sh, mesh)
    predict = make_predict(model, mesh)
    select_metric = task.select_metric
    scored = config.data.labels or class_names

    def evaluate(params, split, indices):
      batches = downstream.eval_batches(config, source["select"], split, indices, decode)
      return task.score(predict_split(config, predict, params, batches, mesh), scored)

    best_ckpt = checkpoint.BestCheckpoint(os.path.join(workdir, "checkpoints"), select_metric)
    history = []
    if config.train.epochs == 0:  # zero-shot: the pre-trained model as it is
      best_ckpt.save(0, params, 0.0)
    data = (downstream.train_dataset(config,
                                     source["train"], train_idx, decode, jax.process_index(),
                                     jax.process_count()) if config.train.epochs else None)
    step = 0
    nonfinite = train.NonFiniteSteps(config.train, 0)

    def mean_loss(pairs):  # (loss, nonfinite) per step -> the mean loss of the applied steps
      good = [value for value, bad in pairs if not bad]
      return float(np.mean(good)) if good else math.nan

    for epoch in range(1, config.train.epochs + 1):
      running = []
      for _ in range(steps_per_epoch):
        batch = sharding.global_batch(next(data), mesh)
        params, opt_state, loss, bad = train_step(params, opt_state, batch, step)
        running.append((loss, bad))
        step += 1
        if step % config.train.log_every == 0:
          log.scalars(step, {"loss": mean_loss(jax.device_get(running[-config.train.log_every:]))})
      running = jax.device_get(running)
      why = nonfinite.update([int(bad) for _, bad in running], step - len(running) + 1)
      if why:
        raise checkpoint.NonFiniteLossError(f"[{protocol}] stopped: {why}. The last good step is "
                                            f"{nonfinite.last_good}")
      skipped = sum(int(bad) for _, bad in running)
      val = evaluate(params, *plan.select)
      history.append({
          "epoch": epoch, "step": step, "loss": mean_loss(running),
          **{k: v for k, v in val.items() if isinstance(v, float)}
      })
      log.scalars(
          step,
          {
              "loss": history[-1]["loss"],
              "epoch": epoch,  # the epoch's mean
              "nonfinite_steps": skipped
          })
      log.scalars(step, {k: v for k, v in history[-1].items() if k not in ("epoch", "step")},
                  prefix="select")
      if skipped:
        history[-1]["nonfinite_steps"] = skipped
        log_print(f"[{protocol}] epoch {epoch}: {skipped} non-finite steps left out")
      log_print(f"[{protocol}] epoch {epoch}/{config.train.epochs} loss {history[-1]['loss']:.4f} "
                f"{select_metric} on {plan.select[0]} {val[select_metric]:.4f}")
      best_ckpt.save(epoch, params, val[select_metric])
    params, best = best_ckpt.restore_best(params)
    alignment = task.head == "alignment"  # retrieval: ITM re-ranking, pictures of the top images
    rerank = alignment and config.retrieval.rerank_k > 0
    test_rows = predict_split(config, predict, params,
                              downstream.eval_batches(config, source["test"], *plan.test, decode),
                              mesh, keep_inputs=alignment)
    test = task.score(test_rows, scored)
    if rerank:
      test = {
          **test,
          **{f"itm_{k}": v for k, v in itm_rerank(config, model, params, test_rows, mesh).items()}
      }
  result = {
      "task": config.task, "dataset": config.dataset, "protocol": protocol, "best_epoch": best,
      "selected_on": plan.select[0], "select_metric": select_metric,
      "selected_on_test": plan.selected_on_test, "notes": plan.notes, "num_train": len(train_idx),
      "num_select": len(plan.select[1]), "num_test": int(test["n"]), "test": test,
      "history": history
  }
  if task.answers:
    result["majority_baseline"] = majority_baseline(builder, plan, test_rows)
    result["num_answers"] = len(plan.vocab)
  log.scalars(step, {k: v for k, v in test.items() if isinstance(v, float)}, prefix="test")
  if jax.process_index() == 0:
    result["pictures"] = pictures(config, model_cfg, params, test_rows, tokenizer_dir, workdir,
                                  step)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(result, f, indent=1)
  return result


def finetune(config: ml_collections.ConfigDict, init: str, workdir: str, log_print=print) -> dict:
  """Every protocol of config.protocols; returns {protocol: result} (also <workdir>/results.json)."""
  if not config.data_dir:
    raise ValueError("data_dir is empty: set --config.data_dir to the directory given to "
                     f"`mpma-data build {config.dataset} ... --data_dir DIR`")
  pre_config, pretrained, step, tokenizer_dir = checkpoint.load_init(init)
  tokenizers.load_tokenizer(tokenizer_dir)  # fails early on a broken run directory
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "init.json"), "w") as f:
      json.dump(
          {
              "init": os.path.abspath(init), "step": step, "model": model_config(
                  config, pre_config.model).to_dict()
          }, f, indent=1)
  log_print(f"fine-tuning {config.dataset} ({config.task}) from {init} (step {step})")
  results = {}
  for protocol in config.protocols:
    results[protocol] = run_protocol(config, protocol, pre_config, pretrained, tokenizer_dir,
                                     os.path.join(workdir, protocol), log_print)
    log_print(f"[{protocol}] test: " + json.dumps(
        {k: round(v, 4) for k, v in results[protocol]["test"].items() if isinstance(v, float)}))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
  return results
