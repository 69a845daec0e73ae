"""MPMA pre-training: the sharded train state, the jit-compiled train step and the training loop.

Read top to bottom: `TrainState` / `create_train_state` (sharded init) -> `make_train_step`
(gradient accumulation, non-finite guard; the objective is losses.compute_losses) -> `Preemption`
(SIGTERM) -> `NonFiniteSteps` -> `train_and_evaluate` (the loop; checkpoints in checkpoint.py,
metrics in logger.py) -> `pretrain` (the whole of mpma-pretrain: data, tokenizer, config.json).

Parallelism is a config change: `config.mesh` sizes the (data, fsdp, tensor) mesh and its rule
table maps the model's logical axis names onto it; the step is one `jax.jit` over global arrays, so
the contrastive losses see the global batch.
"""
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mpma_jax import checkpoint, logger, losses, optim, retrieval, sharding, validate, visualize
from mpma_jax.data import pipeline
from mpma_jax.data import tokenizer as tokenizers
from mpma_jax.interop import pretrained
from mpma_jax.models.mpma import MPMA


# --- state ----------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], steps (batches) consumed
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2], raw key; step s uses fold_in(rng, s) (dropout, ITM negatives)


def init_params(config: ml_collections.ConfigDict, model: MPMA, rng) -> Any:
  """Boxed (logically named) parameters of the whole model: the poolers and the ITM head are
  created even when the ITM loss is off, so that every checkpoint can be fine-tuned or exported."""
  return model.init({"params": rng, "itm": rng}, pipeline.dummy_batch(config, 2),
                    with_itm=True)["params"]


def _init_boxed(config, model, tx):
  """() -> boxed TrainState. Keys are made inside, so that the function only ever runs traced (jit,
  eval_shape): nothing executes on the target devices, which need not exist (aot.py)."""
  def init():
    params = init_params(config, model, jax.random.key(config.seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(config.seed + 1)))

  return init


def abstract_state(config, model, tx, mesh, rule_table):
  """(ShapeDtypeStructs of the train state carrying their shardings, the shardings), without
  allocating anything: the restore target, and what benchmarks compile against."""
  init = _init_boxed(config, model, tx)
  shardings = sharding.logical_shardings(jax.eval_shape(init), mesh, rule_table)
  abstract = jax.eval_shape(jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings))
  return abstract, shardings


def create_train_state(config, model, tx, mesh, rule_table, shardings=None):
  """Initialises the state directly into its shardings (computed here unless given, e.g. by
  `abstract_state`). Returns (state, state_shardings)."""
  if shardings is None:
    _, shardings = abstract_state(config, model, tx, mesh, rule_table)
  init = jax.jit(lambda: nn.meta.unbox(_init_boxed(config, model, tx)()), out_shardings=shardings)
  return init(), shardings


def load_pretrained(config, state: TrainState, shardings: TrainState, tx, workdir: str,
                    log=None) -> TrainState:
  """The fresh state with the `init.*` checkpoints written into its parameters (placed in their
  shardings; each process reads the files itself) and a matching fresh optimizer state. The import
  reports go to <workdir>/init_report.txt."""
  params, reports = pretrained.initialise(config, state.params)

  def place(x, s):  # imported leaves are host arrays; untouched ones are still sharded arrays
    if isinstance(x, jax.Array):  # (re-stacked model.scan blocks may have lost their sharding)
      return x if x.sharding == s else jax.jit(lambda y: y, out_shardings=s)(x)
    x = np.asarray(x, np.float32)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  params = jax.tree.map(place, params, shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "init_report.txt"), "w") as f:
      f.write("\n\n".join(r.summary() for r in reports) + "\n")
  if log is not None:
    for r in reports:
      log.print(r.summary().splitlines()[0])
  return state.replace(params=params, opt_state=opt_state)


# --- train step -----------------------------------------------------------------------------------
def make_train_step(config, model: MPMA, tx, state_shardings, mesh) -> Callable:
  """jit-compiled (state, batch) -> (state, metrics).

  * train.grad_accum > 1 splits the global batch into that many micro-batches (each still spread
    over every device) and averages their gradients; the contrastive losses then see the global
    micro-batch as negatives.
  * A step whose loss, gradient norm, new parameters or new optimizer state is not finite leaves
    parameters and optimizer state unchanged (metrics['nonfinite'] = 1); the loop then skips it
    or stops (train.nonfinite, train.max_nonfinite_*).
  * Per-example data counters in the batch (pipeline.COUNTER_FIELDS) come back summed over the
    global batch as metrics['data_<name>'].
  """
  with_itm = config.loss.itm > 0
  accum = config.train.grad_accum
  if accum < 1 or config.train.batch_size % accum:
    raise ValueError(f"train.grad_accum={accum} must be >= 1 and divide train.batch_size="
                     f"{config.train.batch_size}")
  schedule = optim.schedule(config.optim, config.train.steps, config.optim.lr)
  micro_sharding = jax.sharding.NamedSharding(mesh,
                                              jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))

  def loss_and_grads(params, batch, rng):
    dropout_rng, itm_rng = jax.random.split(rng)

    def loss_fn(params):
      out = model.apply({"params": params}, batch, deterministic=False, with_itm=with_itm,
                        paired=config.masking.paired, rngs={"dropout": dropout_rng, "itm": itm_rng})
      return losses.compute_losses(out, batch, config)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return metrics, grads

  def accumulated(params, batch, rng):
    """Mean metrics and gradients over `accum` micro-batches (a scan: one micro-batch live)."""
    # Row j*accum + i of the batch goes to micro-batch i, so each micro-batch keeps the batch's
    # sharding: [G, ...] -> [G/a, a, ...] -> [a, G/a, ...].
    micro = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), micro_sharding
        ), batch)

    def body(total, xs):
      i, mb = xs
      out = loss_and_grads(params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, total, out), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(loss_and_grads, params, first, rng))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    return jax.tree.map(lambda x: x / accum, total)

  def step_fn(state: TrainState, batch: dict):
    counters = {k: batch[k] for k in pipeline.COUNTER_FIELDS if k in batch}
    batch = {k: v for k, v in batch.items() if k not in counters}
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if accum == 1:
      metrics, grads = loss_and_grads(state.params, batch, rng)
    else:
      metrics, grads = accumulated(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)

    def apply(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state

    # A finite gradient can still give a non-finite update (Adam with eps=0 on a zero gradient, a
    # learning rate that overflows), so what the step would write is checked too: on its own copy
    # of the update, which XLA fuses into per-leaf reductions (no state-sized buffer is written),
    # while the update that is kept runs inside the cond, in place on the donated state. A cond
    # rather than jnp.where(finite, new, old) per leaf: with the state donated, the where makes XLA
    # copy every old leaf first (it is read after the new value overwrites its buffer): ~600
    # copies, the update ~2.5x slower on a CPU.
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) &
              checkpoint.all_finite(apply(None)))
    params, opt_state = jax.lax.cond(finite, apply, lambda _: (state.params, state.opt_state), None)
    metrics["grad_norm"] = grad_norm
    metrics["lr"] = schedule(state.step)
    metrics["nonfinite"] = 1 - finite.astype(jnp.int32)
    metrics.update({f"data_{k}": jnp.sum(v) for k, v in counters.items() if k != "source"})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_shardings = sharding.batch_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=0)


# --- the loop -------------------------------------------------------------------------------------
class Preemption:
  """SIGTERM (a scheduler's preemption notice) -> `reached(step)` turns true at a step boundary;
  the loop then saves a checkpoint there and exits cleanly.

  One process: a SIGTERM handler sets a flag. Several processes: JAX's preemption service (started
  by jax.distributed.initialize) catches SIGTERM on any host and picks one step at which
  `reached` is true on every host, so that all of them save the same step.
  """
  def __init__(self):
    self._flag = threading.Event()
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._flag.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag.is_set()
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
      return False


class NonFiniteSteps:
  """Host-side count of the steps the train step's guard left out; says when the run must stop:
  train.nonfinite='stop' at the first one, 'skip' once more than train.max_nonfinite_consecutive
  of them in a row or more than train.max_nonfinite_total in all (since this process started;
  0 = no limit) were left out. `start`: the step the run starts from (its state is good)."""
  def __init__(self, train_config: ml_collections.ConfigDict, start: int):
    self.policy = train_config.nonfinite
    if self.policy not in ("skip", "stop"):
      raise ValueError(f"train.nonfinite must be 'skip' or 'stop', got {self.policy!r}")
    self.max_consecutive = train_config.max_nonfinite_consecutive
    self.max_total = train_config.max_nonfinite_total
    self.consecutive = self.total = 0
    self.last_good = start  # the last step whose update was applied (or the starting step)

  def update(self, flags, first: int) -> Optional[str]:
    """flags: 1 for each step left out, 0 for each applied one, from step `first` on. Returns None,
    or why the run must stop (one line, naming the config field)."""
    for step, flag in enumerate(flags, start=first):
      if not flag:
        self.consecutive, self.last_good = 0, step
        continue
      self.consecutive += 1
      self.total += 1
      if self.policy == "stop":
        return f"non-finite step {step} (train.nonfinite='stop')"
      if self.max_consecutive and self.consecutive > self.max_consecutive:
        return (f"{self.consecutive} consecutive non-finite steps at step {step} > "
                f"train.max_nonfinite_consecutive={self.max_consecutive}")
      if self.max_total and self.total > self.max_total:
        return (f"{self.total} non-finite steps by step {step} > "
                f"train.max_nonfinite_total={self.max_total}")
    return None


def restore_intact(config, ckpt: checkpoint.Checkpointer, abstract, data_iter, log):
  """(state, step) of the newest checkpoint that reads back intact. A damaged one is moved to
  <workdir>/damaged_checkpoints/ with a warning and the one before it is tried, unless
  train.ckpt_fallback is off; then, or when none is intact, validate.UsageError (one line)."""
  steps = ckpt.all_steps()
  for i, step in enumerate(reversed(steps)):
    try:
      return ckpt.restore(step, abstract, data_iter), step
    except checkpoint.CorruptCheckpointError as e:
      if not config.train.ckpt_fallback:
        raise validate.UsageError(f"{e} (train.ckpt_fallback=False)") from e
      if i == len(steps) - 1:
        raise validate.UsageError(f"{e}; no intact checkpoint is left") from e
      moved = ckpt.set_aside(step)
      log.print(f"warning: {e}; moved to {moved}, resuming from the checkpoint before it")
  raise AssertionError("restore_intact needs at least one checkpoint")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, tokenizer,
                       tokenizer_dir: str, data_dir: str, resume: bool = False) -> dict:
  """Pre-trains, checkpoints, and ends with zero-shot retrieval. Returns the eval dict, or
  {'stopped_at': step, 'reason': ...} when the run stopped early with a checkpoint (SIGTERM,
  train.run_steps); continue it with resume=True."""
  mesh = sharding.make_mesh(config.mesh)
  rule_table = sharding.rules(config.mesh)
  model = MPMA.from_config(config)
  tx = optim.make_optimizer(config)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config)
  latest = ckpt.latest_step()
  if latest is not None and not resume:  # refuse before any work is done
    raise FileExistsError(f"{workdir} already holds checkpoints (latest step {latest}); pass "
                          "--resume to continue, or use a new workdir")
  NonFiniteSteps(config.train, 0)  # a bad train.nonfinite fails before any work is done
  log = logger.Logger(workdir)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
    abstract, state_shardings = abstract_state(config, model, tx, mesh, rule_table)
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    log.print(f"model: {n_params:,} parameters; mesh {dict(mesh.shape)}; "
              f"{jax.process_count()} process(es), {jax.device_count()} device(s)")

    pairs = pipeline.eval_pairs(config, tokenizer, config.eval.num_pairs, data_dir)
    embed_fn = retrieval.make_embed_fn(model, mesh)
    dataset = pipeline.pretrain_dataset(config, tokenizer_dir, data_dir)
    data_iter = iter(dataset)
    untrained_file = os.path.join(workdir, "eval_untrained.json")
    if latest is None:
      state, _ = create_train_state(config, model, tx, mesh, rule_table, state_shardings)
      if pretrained.requested(config):  # init.m3ae / init.image / init.text
        state = load_pretrained(config, state, state_shardings, tx, workdir, log)
      untrained = retrieval.evaluate(embed_fn, state.params, pairs, config.eval.batch_size)
      if jax.process_index() == 0:
        with open(untrained_file, "w") as f:
          json.dump(untrained, f)
      start = 0
    else:  # restored straight into its shardings: the fresh state is never allocated
      state, latest = restore_intact(config, ckpt, abstract, data_iter, log)
      untrained = None
      if os.path.exists(untrained_file):
        with open(untrained_file) as f:
          untrained = json.load(f)
      start = latest
      log.print(f"resumed from step {start}")
      # metrics.jsonl: lines after `start` (logged, never checkpointed) are repeated from here on
      log.scalars(start, {"from_step": start}, prefix="restart")

    train_step = make_train_step(config, model, tx, state_shardings, mesh)
    throughput = logger.Throughput(config)
    steps, log_every = config.train.steps, config.train.log_every
    stop_at = min(steps, start + config.train.run_steps) if config.train.run_steps else steps
    t0, pending, unchecked, saved, reason = time.perf_counter(), [], [], start, None
    # over the whole run (carried over on resume), global batch
    data_counts = (logger.resume_counters(workdir, start)
                   if start else {k: 0 for k in logger.COUNTERS})
    nonfinite = NonFiniteSteps(config.train, start)

    def check_finite(done):
      """Counts the steps the guard left out since the last check; raises, before anything more
      is checkpointed, when train.nonfinite or a train.max_nonfinite_* limit says stop."""
      flags = [int(f) for f in jax.device_get(unchecked)]
      why = nonfinite.update(flags, first=done - len(flags) + 1)
      unchecked.clear()
      if why:
        ckpt.close()  # the saves already made (all of finite states) complete
        latest = ckpt.latest_step()
        raise checkpoint.NonFiniteLossError(
            f"stopped: {why}. The last good step is {nonfinite.last_good}; " +
            (f"the last good checkpoint is step {latest} in {workdir}/checkpoints"
             if latest is not None else f"there is no checkpoint yet in {workdir}/checkpoints"))

    with Preemption() as preemption:
      for step in range(start, stop_at):
        host_batch = next(data_iter)
        batch = sharding.global_batch({k: v for k, v in host_batch.items() if k != "source"}, mesh)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        unchecked.append(metrics["nonfinite"])
        done = step + 1
        if done % log_every == 0 or done == stop_at:
          host = jax.device_get(pending)  # one host sync per log interval
          check_finite(done)
          for k in data_counts:
            data_counts[k] += sum(int(m[f"data_{k}"]) for m in host)
          avg = logger.summarise(host)
          avg.update(throughput(len(host), time.perf_counter() - t0))
          avg.update({f"data_{k}": float(v) for k, v in data_counts.items()})
          log.scalars(done, avg)
          mfu = f"  MFU {100 * avg['mfu']:.1f}%" if "mfu" in avg else ""
          log.print(f"step {done:>6}/{steps}  {logger.format_metrics(avg)}  "
                    f"{avg['examples_per_sec']:.1f} ex/s  "
                    f"{avg['tflops_per_device']:.3g} TFLOP/s/device{mfu}")
          t0, pending = time.perf_counter(), []
        if preemption.reached(done):
          reason = f"preempted (SIGTERM) at step {done}"
        elif done == stop_at and stop_at < steps:
          reason = f"train.run_steps={config.train.run_steps} reached at step {done}"
        if done % config.train.ckpt_every == 0 or done == steps or reason:
          check_finite(done)
          ckpt.save(done, state, data_iter)
          saved = done
        if reason:
          break
    ckpt.close()  # waits for the last asynchronous save
    if reason:
      log.print(f"{reason}: checkpoint {saved} saved; continue with --resume")
      return {"stopped_at": saved, "reason": reason}

    trained = retrieval.evaluate(embed_fn, state.params, pairs, config.eval.batch_size)
  result = {
      "num_pairs": config.eval.num_pairs, "steps": steps, "num_params": int(n_params),
      "trained": trained, "untrained": untrained, "chance": retrieval.chance(config.eval.num_pairs)
  }
  log.scalars(steps, trained, prefix="eval")
  rows = {"trained": trained, "untrained": untrained, "chance": result["chance"]}
  log.print("zero-shot retrieval (%), GLA global similarity, "
            f"{config.eval.num_pairs} held-out pairs:\n" +
            retrieval.format_table({k: v for k, v in rows.items() if v is not None}))
  if jax.process_index() == 0:
    # MIM, alignment, retrieval, curves (visualize.py). One process only: restoring the checkpoint
    # there would wait for the other processes, which have finished (run mpma-visualize after).
    if config.eval.get("pictures", True) and jax.process_count() == 1:
      result["pictures"] = visualize.visualize_run(workdir, step=steps)
      log.print("pictures: " + ", ".join(result["pictures"]))
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


# --- the whole command ----------------------------------------------------------------------------
def prepare_tokenizer(config, workdir: str, data_dir: str):
  """The run's tokenizer, saved in (or read from) <workdir>/tokenizer so a resumed run or an export
  sees exactly the same ids. Returns (tokenizer, directory)."""
  run_dir = os.path.join(workdir, "tokenizer")
  # Process 0 writes the run's tokenizer; the others wait for it and read the same files.
  if jax.process_index() == 0 and not os.path.isdir(run_dir):
    if config.data.tokenizer == "builtin":  # WordPiece trained on (up to 20k) training texts
      corpus = pipeline.report_corpus(config, data_dir, 20_000)
      tokenizers.train_wordpiece(corpus, config.data.tokenizer_vocab, run_dir)
    else:
      tokenizers.load_tokenizer(config.data.tokenizer).save_pretrained(run_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mpma_jax: tokenizer written")
  tok = tokenizers.load_tokenizer(run_dir)
  check_tokenizer(tok, config)
  return tok, run_dir


def check_tokenizer(tok, config) -> None:
  text = config.model.text
  if len(tok) > text.vocab_size:
    raise ValueError(f"the tokenizer has {len(tok)} tokens but model.text.vocab_size is "
                     f"{text.vocab_size}; raise model.text.vocab_size")
  if tok.pad_token_id != text.pad_id:
    raise ValueError(f"the tokenizer's pad token id is {tok.pad_token_id} but model.text.pad_id "
                     f"is {text.pad_id}; set --config.model.text.pad_id={tok.pad_token_id}")
  if tok.mask_token_id is None:
    raise ValueError("the tokenizer has no mask token, which MLM needs")
  need = config.data.max_len + (text.pad_id + 1 if text.position_style == "roberta" else 0)
  if need > text.max_positions:
    raise ValueError(f"data.max_len={config.data.max_len} needs {need} position embeddings but "
                     f"model.text.max_positions is {text.max_positions}")


def resume_decision(workdir: str, resume) -> tuple[bool, Optional[int]]:
  """(resume or not, the latest checkpoint step) for resume = True | False | 'auto' (resume when
  the workdir holds a checkpoint). Process 0 looks and every process follows it, so that all of
  them decide the same even while storage is still settling."""
  latest = checkpoint.latest_step(os.path.join(workdir, "checkpoints"))
  if jax.process_count() > 1:
    latest = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if latest is None else latest)))
    latest = None if latest < 0 else latest
  if resume == "auto":
    return latest is not None, latest
  if resume not in (True, False):
    raise validate.UsageError(f"--resume={resume!r}: expected true, false or auto")
  return resume, latest


def pretrain(config: ml_collections.ConfigDict, workdir: str, resume=False) -> dict:
  """mpma-pretrain after the processes have joined: checks the whole command first (the config,
  the workdir against --resume, a resumed config against its checkpoints; validate.UsageError,
  with nothing written), then prepares the workdir (data, tokenizer, config.json) and runs
  `train_and_evaluate`. resume: True, False or 'auto' (`resume_decision`)."""
  for change in pretrained.adapt_config(config):  # init.* checkpoints set the encoder sizes
    print(f"config: {change}")
  validate.check(config, jax.device_count())
  resume, latest = resume_decision(workdir, resume)
  if latest is not None and not resume:
    raise validate.UsageError(f"{workdir} already holds checkpoints (latest step {latest}); pass "
                              "--resume to continue, or use a new workdir")
  if latest is not None:
    changed = validate.resume_differences(checkpoint.run_config(workdir), config)
    if changed:
      raise validate.UsageError(f"--resume of {workdir} with a config that changes what its "
                                "checkpoints hold: " + "; ".join(changed))
  try:
    data_dir = pipeline.data_dir_for(config, workdir)
    pipeline.prepare(config, data_dir)  # generates the synthetic set if it is used and missing
  except (ValueError, FileNotFoundError) as e:
    raise validate.UsageError(str(e)) from e
  os.makedirs(workdir, exist_ok=True)
  try:
    tok, tok_dir = prepare_tokenizer(config, workdir, data_dir)
  except (ValueError, FileNotFoundError) as e:  # the tokenizer does not fit model.text
    raise validate.UsageError(str(e)) from e
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  return train_and_evaluate(config, workdir, tok, tok_dir, data_dir, resume=resume)
