"""Restartability guarantees of the training loop (Orbax CheckpointManager):

(a) N steps straight == N/2, restart, N/2 (identical parameters);
(b) a checkpoint restores onto a different mesh shape;
(c) SIGTERM makes the run save and exit cleanly, and a restart continues;
(d) SIGKILL in the middle of a save leaves the previous checkpoint, which the restart uses;
and the non-finite-loss policies (skip / stop keeping the last good checkpoint).
"""
import json
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpma_jax import optim, sharding, train
from mpma_jax.data import tokenizer as tokenizers
from tests import train_worker
from tests.conftest import tiny_config

OVERRIDES = {"train.steps": 6, "train.ckpt_every": 2, "train.log_every": 1,
             "eval.num_pairs": 16, "eval.batch_size": 16}


def run_config(**extra):
  return train_worker.apply_overrides(tiny_config(), {**OVERRIDES, **extra})


def restore_state(config, workdir, step, mesh_sizes=None):
  """The train state saved at `step`, restored onto the config's mesh (or `mesh_sizes`)."""
  if mesh_sizes:
    config.mesh.update(data=mesh_sizes[0], fsdp=mesh_sizes[1], tensor=mesh_sizes[2])
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  model, tx = train.make_model(config), optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, _ = train.abstract_state(config, model, tx, mesh, rules)
    ckpt = train.Checkpointer(os.path.join(workdir, "checkpoints"), config)
    restored = ckpt.restore(step, abstract)
    ckpt.close()
  return restored


def assert_same(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def train_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tokenizer_dir, data_dir):
  """6 steps in one go."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  result = train.train_and_evaluate(run_config(), workdir, tok, tokenizer_dir, data_dir)
  return workdir, result


def test_half_restart_half_equals_straight(straight, tmp_path, tokenizer_dir, data_dir):
  """(a) train.run_steps=3 stops with a checkpoint at 3; --resume runs 3 more: the parameters,
  optimizer state and evaluation equal those of the straight run exactly."""
  workdir = str(tmp_path)
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  first = train.train_and_evaluate(run_config(**{"train.run_steps": 3}), workdir, tok,
                                   tokenizer_dir, data_dir)
  assert first == {"stopped_at": 3, "reason": "train.run_steps=3 reached at step 3"}
  assert not os.path.exists(os.path.join(workdir, "eval.json"))
  with pytest.raises(FileExistsError, match="--resume"):
    train.train_and_evaluate(run_config(), workdir, tok, tokenizer_dir, data_dir)
  second = train.train_and_evaluate(run_config(), workdir, tok, tokenizer_dir, data_dir,
                                    resume=True)
  assert second == straight[1]  # the same retrieval figures, untrained ones included
  assert_same(restore_state(run_config(), workdir, 6), restore_state(run_config(), straight[0], 6))
  # the logged losses continue exactly where the first half stopped
  assert [r["step"] for r in train_rows(workdir)] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in train_rows(workdir)] == [r["loss"] for r in train_rows(straight[0])]


def test_checkpoint_restores_onto_another_mesh(straight):
  """(b) saved on (8, 1, 1); restored onto (2, 2, 2) and (1, 8, 1): the same values, laid out as
  the new mesh asks."""
  saved = restore_state(run_config(), straight[0], 6)
  for mesh_sizes in ((2, 2, 2), (1, 8, 1)):
    state = restore_state(run_config(), straight[0], 6, mesh_sizes)
    assert_same(state, saved)
    kernel = state.params["image_encoder"]["block_0"]["mlp"]["fc1"]["kernel"]  # [64, 256]
    _, fsdp, tensor = mesh_sizes
    assert kernel.sharding.shard_shape(kernel.shape) == (64 // fsdp, 256 // tensor)
  assert int(saved.step) == 6 and saved.rng.shape == (2,)


def worker(workdir, tokenizer_dir, data_dir, overrides, *extra):
  return train_worker.start(workdir, tokenizer_dir, data_dir, {**OVERRIDES, **overrides}, *extra)


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, tokenizer_dir, data_dir):
  """(c) A long run gets SIGTERM after a few steps: it checkpoints the step it is at (not an
  interval step) and exits 0; a restart continues from there."""
  workdir = str(tmp_path)
  proc = worker(workdir, tokenizer_dir, data_dir, {"train.steps": 10_000, "train.ckpt_every": 10_000})
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, output[-3000:]
  stopped = train_worker.result_of(output)
  k = stopped["stopped_at"]
  assert k >= 3 and "SIGTERM" in stopped["reason"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(k)]
  assert not os.path.exists(os.path.join(workdir, "eval.json"))

  proc = worker(workdir, tokenizer_dir, data_dir,
                {"train.steps": 10_000, "train.ckpt_every": 10_000, "train.run_steps": 2},
                "--resume")
  output = proc.communicate(timeout=240)[0]
  assert proc.returncode == 0, output[-3000:]
  assert f"resumed from step {k}" in output
  assert train_worker.result_of(output)["stopped_at"] == k + 2
  steps = [r["step"] for r in train_rows(workdir)]
  assert steps[-2:] == [k + 1, k + 2] and len(steps) == len(set(steps))


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(straight, tmp_path, tokenizer_dir,
                                                            data_dir):
  """(d) The process is killed (SIGKILL) while checkpoint 4 is being written: checkpoint 2 stays
  the latest, the restart resumes from it and ends exactly where the straight run ended."""
  workdir = str(tmp_path)
  proc = worker(workdir, tokenizer_dir, data_dir, {}, "--kill_in_save_at", "4")
  output = proc.communicate(timeout=240)[0]
  assert proc.returncode == -signal.SIGKILL, output[-3000:]
  entries = os.listdir(os.path.join(workdir, "checkpoints"))
  assert "2" in entries and "4" not in entries, entries  # 4 never became a checkpoint
  assert any(e.startswith("4.") for e in entries), entries  # ... but its write had begun

  proc = worker(workdir, tokenizer_dir, data_dir, {}, "--resume")
  output = proc.communicate(timeout=240)[0]
  assert proc.returncode == 0, output[-3000:]
  assert "resumed from step 2" in output
  assert train_worker.result_of(output) == straight[1]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2", "4", "6"]
  assert_same(restore_state(run_config(), workdir, 6), restore_state(run_config(), straight[0], 6))


def _poison(monkeypatch, position):
  """Makes the loss NaN for the batch holding stream `position` (as a bad batch would)."""
  compute = train.compute_losses

  def poisoned(out, batch, config):
    total, metrics = compute(out, batch, config)
    bad = jnp.any(batch["index"] == position)
    total = jnp.where(bad, jnp.nan, total)
    metrics["loss"] = total
    return total, metrics
  monkeypatch.setattr(train, "compute_losses", poisoned)


def test_nonfinite_loss_skip_and_stop(monkeypatch, tmp_path, tokenizer_dir, data_dir):
  """The batch of step 3 gives a NaN loss. 'skip': counted, the run finishes with finite
  parameters. 'stop': the run raises and the last checkpoint is step 2 (the good one)."""
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  _poison(monkeypatch, position=2 * 8)  # the first example of the third batch (batch size 8)
  skip_dir = str(tmp_path / "skip")
  train.train_and_evaluate(run_config(), skip_dir, tok, tokenizer_dir, data_dir)
  rows = train_rows(skip_dir)
  assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 0, 0, 0]
  assert all(np.isfinite(r["loss"]) for r in rows if not r["nonfinite_steps"])
  state = restore_state(run_config(), skip_dir, 6)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))

  stop_dir = str(tmp_path / "stop")
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint is step 2"):
    train.train_and_evaluate(run_config(**{"train.nonfinite": "stop"}),
                             stop_dir, tok, tokenizer_dir, data_dir)
  assert sorted(os.listdir(os.path.join(stop_dir, "checkpoints"))) == ["2"]
