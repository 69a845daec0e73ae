"""MPMA pre-training: losses, the jit-compiled train step, checkpoints and the training loop.

Read top to bottom: `compute_losses` (method.md §4) -> `TrainState` / `create_train_state`
(sharded init) -> `make_train_step` -> `Checkpointer` -> `train_and_evaluate` (the loop).
"""
import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from mpma_jax import evaluate, losses, masking, optim, sharding
from mpma_jax.data import pipeline
from mpma_jax.models import gla
from mpma_jax.models.mpma import MPMA
from mpma_jax.models.vit import normalize_images

LOSS_NAMES = ("mlm", "mim", "global", "local", "itm")


def loss_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {"mlm": config.loss.mlm, "mim": config.loss.mim, "global": config.loss.global_,
          "local": config.loss.local, "itm": config.loss.itm}


# --- losses ---------------------------------------------------------------------------------------
def compute_losses(out: dict, batch: dict, config: ml_collections.ConfigDict):
  """Model outputs + batch -> (weighted total, metrics). All in float32; a loss whose weight is 0
  is not computed."""
  w = loss_weights(config)
  m = config.model
  metrics = {}
  if w["mlm"]:
    metrics["mlm"], metrics["mlm_acc"] = losses.mlm_loss(out["mlm_logits"], batch["mlm_labels"])
  if w["mim"]:
    num_kept = batch["image_keep"].shape[1]
    metrics["mim"] = losses.mim_loss(out["mim_pred"], normalize_images(batch["image"]),
                                     batch["image_restore"], num_kept, m.image.patch,
                                     norm_pix=m.mim.norm_pix)
  if w["global"]:
    metrics["global"] = losses.global_alignment_loss(
        out["image_gla"][:, 0], out["text_gla"][:, 0], out["temperature_global"])
  if w["local"]:
    image_local, text_local = out["image_gla"][:, 1:], out["text_gla"]  # patches, all tokens
    if m.gla.local == "filip":
      i2t, t2i = gla.filip_similarity(image_local, text_local, batch["word_mask"], m.gla.chunk)
    elif m.gla.local == "attention":
      i2t, t2i = gla.attention_similarity(image_local, text_local, batch["word_mask"],
                                          m.gla.attention_temp, m.gla.agg_temp, m.gla.chunk)
    else:
      raise ValueError(f"model.gla.local must be 'filip' or 'attention', got {m.gla.local!r}")
    metrics["local"] = losses.symmetric_info_nce(i2t / out["temperature_local"],
                                                 t2i / out["temperature_local"])
  if w["itm"]:
    metrics["itm"], metrics["itm_acc"] = losses.itm_loss(out["itm_logits"], out["itm_labels"])
  total = sum(w[k] * metrics[k] for k in LOSS_NAMES if w[k])
  metrics["loss"] = total
  metrics["temperature_global"] = out["temperature_global"]
  metrics["temperature_local"] = out["temperature_local"]
  return total, metrics


# --- state ----------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict:
  """Zeros with the pipeline's shapes and dtypes (for init and shape inference)."""
  size, patch, length = config.model.image.size, config.model.image.patch, config.data.max_len
  n = (size // patch) ** 2
  keep = masking.num_kept_patches(n, config.masking.image_ratio)
  i32 = lambda *s: np.zeros(s, np.int32)
  return {"image": np.zeros((batch_size, size, size, 3), np.uint8),
          "text_ids": i32(batch_size, length), "text_mask": np.ones((batch_size, length), np.int32),
          "word_mask": i32(batch_size, length), "mlm_ids": i32(batch_size, length),
          "mlm_labels": np.full((batch_size, length), -100, np.int32),
          "image_keep": np.tile(np.arange(keep, dtype=np.int32), (batch_size, 1)),
          "image_restore": np.tile(np.arange(n, dtype=np.int32), (batch_size, 1)),
          "index": np.zeros((batch_size,), np.int64)}


def make_model(config: ml_collections.ConfigDict) -> MPMA:
  return MPMA(ml_collections.FrozenConfigDict(config.model))


def init_params(config: ml_collections.ConfigDict, model: MPMA, rng) -> Any:
  """Boxed (logically named) parameters."""
  return model.init({"params": rng, "itm": rng}, dummy_batch(config, 2),
                    with_itm=config.loss.itm > 0)["params"]


def _init_boxed(config, model, tx):
  rng = jax.random.key(config.seed)

  def init():
    params = init_params(config, model, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def abstract_state(config, model, tx, mesh, rule_table):
  """(ShapeDtypeStructs of the train state carrying their shardings, the shardings), without
  allocating anything: the restore target, and what benchmarks compile against."""
  init = _init_boxed(config, model, tx)
  shardings = sharding.logical_shardings(jax.eval_shape(init), mesh, rule_table)
  abstract = jax.eval_shape(jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings))
  return abstract, shardings


def create_train_state(config, model, tx, mesh, rule_table):
  """Initialises the state directly into its shardings. Returns (state, state_shardings)."""
  _, shardings = abstract_state(config, model, tx, mesh, rule_table)
  init = jax.jit(lambda: nn.meta.unbox(_init_boxed(config, model, tx)()), out_shardings=shardings)
  return init(), shardings


# --- train step -----------------------------------------------------------------------------------
def make_train_step(config, model: MPMA, tx, state_shardings, mesh) -> Callable:
  """jit-compiled (state, batch) -> (state, metrics). Randomness comes from (seed, step)."""
  with_itm = config.loss.itm > 0
  schedule = optim.schedule(config, config.optim.lr)

  def step_fn(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.key(config.seed + 1), state.step)
    dropout_rng, itm_rng = jax.random.split(rng)

    def loss_fn(params):
      out = model.apply({"params": params}, batch, deterministic=False, with_itm=with_itm,
                        rngs={"dropout": dropout_rng, "itm": itm_rng})
      return compute_losses(out, batch, config)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_shardings = sharding.batch_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=0)


# --- checkpoints ----------------------------------------------------------------------------------
class Checkpointer:
  """Orbax CheckpointManager for the train state and the Grain iterator state."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_iterator.get_state())))

  def restore(self, step: int, abstract_state: TrainState, data_iterator) -> TrainState:
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    data_iterator.set_state(restored["data"])
    return restored["state"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(state: TrainState) -> TrainState:
  """Shapes, dtypes and shardings of a live state: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# --- the loop -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Logger:
  """Console lines and TensorBoard scalars (process 0 only)."""
  workdir: str
  writer: Any = None

  def __post_init__(self):
    if jax.process_index() == 0:
      self.writer = SummaryWriter(os.path.join(self.workdir, "tb"))

  def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
    """TensorBoard scalars, and one JSON line per call in <workdir>/metrics.jsonl."""
    if self.writer is None:
      return
    for k, v in values.items():
      self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
    self.writer.flush()
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": step, "split": prefix,
                          **{k: float(v) for k, v in values.items()}}) + "\n")

  def print(self, line: str) -> None:
    if jax.process_index() == 0:
      print(line, flush=True)


def format_metrics(metrics: dict) -> str:
  keys = [k for k in ("loss", *LOSS_NAMES, "mlm_acc", "itm_acc") if k in metrics]
  line = " ".join(f"{k}={metrics[k]:.4f}" for k in keys)
  counts = [f"{k[5:]}={int(metrics[k])}" for k in ("data_bad_image", "data_truncated")
            if metrics.get(k)]  # shown once non-zero
  return " ".join([line] + counts)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, tokenizer,
                       tokenizer_dir: str, data_dir: str, resume: bool = False) -> dict:
  """Pre-trains, checkpoints, and ends with zero-shot retrieval. Returns the eval dict."""
  mesh = sharding.make_mesh(config.mesh)
  rule_table = sharding.rules(config.mesh)
  model = make_model(config)
  tx = optim.make_optimizer(config)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config)
  latest = ckpt.latest_step()
  if latest is not None and not resume:  # refuse before any work is done
    raise FileExistsError(f"{workdir} already holds checkpoints (latest step {latest}); pass "
                          "--resume to continue, or use a new workdir")
  log = Logger(workdir)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
    state, state_shardings = create_train_state(config, model, tx, mesh, rule_table)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.print(f"model: {n_params:,} parameters; mesh {dict(mesh.shape)}")

    pairs = pipeline.eval_pairs(config, tokenizer, config.eval.num_pairs, data_dir)
    embed_fn = evaluate.make_embed_fn(model)
    untrained = evaluate.retrieval(embed_fn, state.params, pairs, config.eval.batch_size)

    dataset = pipeline.pretrain_dataset(config, tokenizer_dir, data_dir)
    data_iter = iter(dataset)
    start = 0
    if latest is not None:
      start = latest
      state = ckpt.restore(start, abstract_like(state), data_iter)
      log.print(f"resumed from step {start}")

    train_step = make_train_step(config, model, tx, state_shardings, mesh)
    steps, log_every = config.train.steps, config.train.log_every
    t0, examples, pending = time.perf_counter(), 0, []
    data_counts = {"bad_image": 0, "truncated": 0}  # since this process started (see pipeline.py)
    for step in range(start, steps):
      host_batch = next(data_iter)
      for k in data_counts:
        data_counts[k] += int(host_batch[k].sum())
      batch = sharding.global_batch(
          {k: v for k, v in host_batch.items() if k not in pipeline.COUNTER_FIELDS}, mesh)
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      examples += config.train.batch_size
      done = step + 1
      if done % log_every == 0 or done == steps:
        host = jax.device_get(pending)  # one host sync per log interval
        avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        rate = examples / (time.perf_counter() - t0)
        avg["examples_per_sec"] = rate
        avg.update({f"data_{k}": float(v) for k, v in data_counts.items()})
        log.scalars(done, avg)
        log.print(f"step {done:>6}/{steps}  {format_metrics(avg)}  {rate:.1f} ex/s")
        t0, examples, pending = time.perf_counter(), 0, []
      if done % config.train.ckpt_every == 0 or done == steps:
        ckpt.save(done, state, data_iter)
    ckpt.close()

    trained = evaluate.retrieval(embed_fn, state.params, pairs, config.eval.batch_size)
  result = {"num_pairs": config.eval.num_pairs, "steps": steps, "num_params": int(n_params),
            "trained": trained, "untrained": untrained,
            "chance": evaluate.chance(config.eval.num_pairs)}
  log.scalars(steps, trained, prefix="eval")
  log.print("zero-shot retrieval (%), GLA global similarity, "
            f"{config.eval.num_pairs} held-out pairs:\n" + evaluate.format_table(
                {"trained": trained, "untrained": untrained, "chance": result["chance"]}))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result
