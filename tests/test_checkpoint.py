"""Restartability guarantees of the training loop (Orbax CheckpointManager):

(a) N steps straight == N/2, restart, N/2 (identical parameters);
(b) a checkpoint restores onto a different mesh shape;
(c) SIGTERM makes the run save and exit cleanly, and a restart continues;
(d) SIGKILL in the middle of a save leaves the previous checkpoint, which the restart uses;
and the non-finite policies (skip up to its limits / stop, keeping the last good checkpoint; a
non-finite state is never checkpointed).
"""
import json
import logging
import os
import re
import shutil
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mpma_jax import checkpoint, logger, losses, optim, overrides, sharding, train, validate
from mpma_jax.data import tokenizer as tokenizers
from mpma_jax.models.mpma import MPMA
from tests import train_worker
from tests.conftest import tiny_config

OVERRIDES = {
    "train.steps": 6, "train.ckpt_every": 2, "train.log_every": 1, "eval.num_pairs": 16,
    "eval.batch_size": 16
}


def run_config(**extra):
  return overrides.apply_all(tiny_config(), {**OVERRIDES, **extra})


def restore_state(config, workdir, step, mesh_sizes=None):
  """The train state saved at `step`, restored onto the config's mesh (or `mesh_sizes`)."""
  if mesh_sizes:
    config.mesh.update(data=mesh_sizes[0], fsdp=mesh_sizes[1], tensor=mesh_sizes[2])
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  model, tx = MPMA.from_config(config), optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, _ = train.abstract_state(config, model, tx, mesh, rules)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config)
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


@pytest.mark.faults
@pytest.mark.slow
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
  # the logged losses continue exactly where the first half stopped, after a restart marker
  assert [r["step"] for r in train_rows(workdir)] == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  marker = [i for i, r in enumerate(rows) if r["split"] == "restart"]
  assert len(marker) == 1 and rows[marker[0]]["step"] == rows[marker[0]]["from_step"] == 3
  assert [r["step"] for r in rows[:marker[0]] if r["split"] == "train"] == [1, 2, 3]
  assert [r["loss"] for r in train_rows(workdir)] == [r["loss"] for r in train_rows(straight[0])]


@pytest.mark.slow
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


@pytest.mark.faults
@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, tokenizer_dir, data_dir):
  """(c) A long run gets SIGTERM after a few steps: it checkpoints the step it is at (not an
  interval step) and exits 0; a restart continues from there."""
  workdir = str(tmp_path)
  proc = worker(workdir, tokenizer_dir, data_dir,
                {"train.steps": 10_000, "train.ckpt_every": 10_000})
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


@pytest.mark.faults
@pytest.mark.slow
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
  compute = losses.compute_losses

  def poisoned(out, batch, config):
    total, metrics = compute(out, batch, config)
    bad = jnp.any(batch["index"] == position)
    total = jnp.where(bad, jnp.nan, total)
    metrics["loss"] = total
    return total, metrics

  monkeypatch.setattr(losses, "compute_losses", poisoned)


@pytest.mark.faults
@pytest.mark.slow
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
  with pytest.raises(checkpoint.NonFiniteLossError, match="last good checkpoint is step 2"):
    train.train_and_evaluate(run_config(**{"train.nonfinite": "stop"}), stop_dir, tok,
                             tokenizer_dir, data_dir)
  assert sorted(os.listdir(os.path.join(stop_dir, "checkpoints"))) == ["2"]


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39 -> inf
def test_nonfinite_updates_are_skipped_and_never_checkpointed(tmp_path, tokenizer_dir, data_dir):
  """optim.lr=1e39 overflows float32: every update is NaN although loss and gradient are finite.
  'skip' (no limits): every step is counted, and the checkpoints (rotated, keep 2) hold the finite
  initial parameters. 'stop': the run raises at step 1, saying that there is no checkpoint yet."""
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  overrides = {
      "optim.lr": 1e39, "train.keep_checkpoints": 2, "train.max_nonfinite_consecutive": 0,
      "train.max_nonfinite_total": 0
  }
  skip_dir = str(tmp_path / "skip")
  train.train_and_evaluate(run_config(**overrides), skip_dir, tok, tokenizer_dir, data_dir)
  rows = train_rows(skip_dir)
  assert [r["nonfinite_steps"] for r in rows] == [1] * 6
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert sorted(os.listdir(os.path.join(skip_dir, "checkpoints")), key=int) == ["4", "6"]
  four, six = (restore_state(run_config(**overrides), skip_dir, s) for s in (4, 6))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((six.params, six.opt_state)))
  assert_same(four.params, six.params)  # nothing was applied

  stop_dir = str(tmp_path / "stop")
  with pytest.raises(checkpoint.NonFiniteLossError) as error:
    train.train_and_evaluate(run_config(**overrides, **{"train.nonfinite": "stop"}), stop_dir, tok,
                             tokenizer_dir, data_dir)
  message = str(error.value)
  assert "non-finite step 1" in message and "last good step is 0" in message
  assert "there is no checkpoint yet" in message and "None" not in message
  assert not os.listdir(os.path.join(stop_dir, "checkpoints"))  # nothing, not even a NaN step 1


def _nan_learning_rate_from(monkeypatch, count):
  """From the optimizer's `count`-th update on, the learning rate is NaN: loss and gradient stay
  finite, the update does not. A skipped step does not advance the count, so every later step is
  non-finite too."""
  schedule = optim.schedule
  monkeypatch.setattr(
      optim, "schedule", lambda optim_config, steps, peak:
      (lambda n: jnp.where(n >= count, jnp.nan,
                           schedule(optim_config, steps, peak)(n))))


@pytest.mark.faults
@pytest.mark.slow
def test_skip_limit_stops_naming_the_last_good_step_and_keeps_a_good_checkpoint(
    monkeypatch, tmp_path, tokenizer_dir, data_dir):
  """Steps 1-2 are applied, every later one is non-finite. With at most 2 in a row, step 5 stops
  the run with one line naming the config field, the last good step (2) and the last good
  checkpoint (4, saved after two skipped steps; keep_checkpoints=1 rotated 2 away): it holds
  finite parameters, those of step 2."""
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  _nan_learning_rate_from(monkeypatch, 2)
  config = run_config(**{"train.keep_checkpoints": 1, "train.max_nonfinite_consecutive": 2})
  with pytest.raises(checkpoint.NonFiniteLossError) as error:
    train.train_and_evaluate(config, str(tmp_path), tok, tokenizer_dir, data_dir)
  message = str(error.value)
  assert "\n" not in message
  assert "3 consecutive non-finite steps at step 5 > train.max_nonfinite_consecutive=2" in message
  assert "last good step is 2" in message and "last good checkpoint is step 4" in message
  assert [r["nonfinite_steps"] for r in train_rows(str(tmp_path))] == [0, 0, 1, 1]
  assert os.listdir(os.path.join(str(tmp_path), "checkpoints")) == ["4"]
  state = restore_state(config, str(tmp_path), 4)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((state.params, state.opt_state)))


def test_nonfinite_steps_limits():
  """The host-side count: consecutive and total limits (0 = none), 'stop' at the first one."""
  def config(policy="skip", consecutive=0, total=0):
    return ml_collections.ConfigDict({
        "nonfinite": policy, "max_nonfinite_consecutive": consecutive, "max_nonfinite_total": total
    })

  count = train.NonFiniteSteps(config(consecutive=2), start=10)
  assert count.update([0, 1, 1, 0, 1, 1], first=11) is None and count.last_good == 14
  assert "at step 17 > train.max_nonfinite_consecutive=2" in count.update([1], first=17)
  count = train.NonFiniteSteps(config(total=3), start=0)
  assert count.update([1, 0, 1, 0], first=1) is None
  assert count.update([0, 1, 0, 1],
                      first=5) == ("4 non-finite steps by step 8 > train.max_nonfinite_total=3")
  assert count.last_good == 7
  assert train.NonFiniteSteps(config(), 0).update([1] * 1000, first=1) is None
  assert "train.nonfinite='stop'" in train.NonFiniteSteps(config("stop"), 0).update([0, 1], 1)
  with pytest.raises(ValueError, match="train.nonfinite"):
    train.NonFiniteSteps(config("ignore"), 0)


@pytest.mark.faults
def test_checkpointer_refuses_a_non_finite_state(tmp_path):
  """Every checkpoint is a good one, so the rotation never drops the last good checkpoint."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), tiny_config())
  state = train.TrainState(step=jnp.array(1), params={"w": jnp.array([1.0, jnp.inf])}, opt_state=(),
                           rng=jnp.zeros(2, jnp.uint32))
  with pytest.raises(checkpoint.NonFiniteLossError, match="step 1: the train state is not finite; "
                     "there is no checkpoint yet"):
    ckpt.save(1, state, data_iterator=None)
  ckpt.close()
  assert ckpt.latest_step() is None


class _Counter:
  """A data iterator's checkpointable part."""
  def get_state(self):
    return {"batches": 3}


def test_restore_params_reads_the_state_without_orbax_warnings(tmp_path, caplog):
  params = {"w": jnp.arange(4.0), "b": {"c": jnp.ones((2, 3))}}
  state = train.TrainState(step=jnp.array(2), params=params, opt_state=(),
                           rng=jnp.zeros(2, jnp.uint32))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), tiny_config())
  ckpt.save(2, state, _Counter())
  ckpt.close()
  with caplog.at_level(logging.WARNING):
    got, step = checkpoint.restore_params(str(tmp_path))
  assert step == 2
  np.testing.assert_array_equal(got["w"], np.arange(4.0))
  np.testing.assert_array_equal(got["b"]["c"], np.ones((2, 3)))
  assert not [r for r in caplog.records if "could not be restored" in r.getMessage()], [
      r.getMessage() for r in caplog.records
  ]


@pytest.mark.faults
def test_run_config_upgrades_an_older_format(tmp_path):
  """A config.json written before format_version existed (format 1: no model.scan, no MIM decoder
  activation / eps) reads back in the current format with the values that keep its behaviour; a
  format newer than the code is refused with one line."""
  config = tiny_config().to_dict()
  del config["format_version"], config["model"]["scan"]
  del config["model"]["mim"]["activation"], config["model"]["mim"]["eps"]
  # format 3's fields, among them a whole section (model.mlm) and one tied to another field
  del config["model"]["mlm"], config["model"]["image"]["pos_resize"], config["masking"]["paired"]
  del config["model"]["mim"]["target_var_unbiased"], config["init"]["text_mlm_head"]
  config["model"]["text"]["eps"] = 1e-7
  (tmp_path / "config.json").write_text(json.dumps(config))
  got = checkpoint.run_config(str(tmp_path))
  assert got.format_version == checkpoint.CONFIG_FORMAT == tiny_config().format_version
  assert got.model.scan is False
  assert (got.model.mim.activation, got.model.mim.eps) == ("gelu", 1e-6)
  assert got.model.mlm.eps == 1e-7 and got.model.image.pos_resize == "jax_bicubic"
  assert got.masking.paired is True and got.init.text_mlm_head is True
  assert got.model.mim.target_var_unbiased is False
  assert got.model.image.size == tiny_config().model.image.size  # the rest as saved
  MPMA.from_config(got)  # builds
  config["format_version"] = checkpoint.CONFIG_FORMAT + 1
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="newer than this mpma_jax reads"):
    checkpoint.run_config(str(tmp_path))


@pytest.mark.faults
def test_resume_counters_continue_from_the_checkpointed_step(tmp_path):
  lines = [{"step": 5, "split": "train", "data_bad_image": 2.0, "data_truncated": 1.0},
           {"step": 10, "split": "train", "data_bad_image": 4.0,
            "data_truncated": 3.0}, {"step": 10, "split": "eval", "i2t_r1": 0.5},
           {"step": 15, "split": "train", "data_bad_image": 9.0, "data_truncated": 9.0}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in lines) + '\n{"step": 20, "spl')  # cut short
  assert logger.resume_counters(str(tmp_path), 10) == {"bad_image": 4, "truncated": 3}
  assert logger.resume_counters(str(tmp_path), 7) == {"bad_image": 2, "truncated": 1}
  assert logger.resume_counters(str(tmp_path), 20) == {"bad_image": 9, "truncated": 9}
  assert logger.resume_counters(str(tmp_path / "none"), 10) == {"bad_image": 0, "truncated": 0}


# --- damaged checkpoints ---------------------------------------------------------------------------
def _largest_file(step_dir: str) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  return max(files, key=os.path.getsize)


def _flip_bytes(path: str, offset_fraction: float = 0.3, count: int = 8) -> None:
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    start = int(len(data) * offset_fraction)
    for i in range(start, min(start + count, len(data))):
      data[i] ^= 0x01
    f.seek(0)
    f.write(bytes(data))


def _copy_run(src: str, dst: str) -> str:
  shutil.copytree(src, dst)
  return dst


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["swap", "flip", "truncate", "delete"])
def test_a_damaged_checkpoint_is_named_and_the_run_falls_back(straight, tmp_path, tokenizer_dir,
                                                              data_dir, damage):
  """The straight run's checkpoints: steps 2, 4, 6. Damaging step 6 (its arrays replaced by step
  4's, a well-formed checkpoint that the storage layer reads back without complaint; a bit in each
  of 8 bytes of its largest data file flipped; that file cut to half; or removed): restoring it
  fails with one line naming the step and the path (for the swap: from the checksums recorded at
  save time; a flip lands either in data that still decodes, caught the same way, or in compressed
  framing that the storage layer rejects). For one damage of each kind (swap: the checksums; cut:
  the storage layer), resuming moves the step aside and continues from step 4, and the two steps
  trained again equal the straight run's bit for bit."""
  workdir = _copy_run(straight[0], str(tmp_path / "run"))
  step6 = os.path.join(workdir, "checkpoints", "6")
  target = _largest_file(os.path.join(step6, "state"))
  if damage == "swap":
    shutil.rmtree(os.path.join(step6, "state"))
    shutil.copytree(os.path.join(workdir, "checkpoints", "4", "state"),
                    os.path.join(step6, "state"))
  elif damage == "flip":
    _flip_bytes(target)
  elif damage == "truncate":
    with open(target, "r+b") as f:
      f.truncate(os.path.getsize(target) // 2)
  else:
    os.remove(target)
  config = run_config()
  with pytest.raises(checkpoint.CorruptCheckpointError) as info:
    restore_state(config, workdir, 6)
  message = str(info.value)
  assert "\n" not in message and "checkpoint step 6" in message and step6 in message, message
  if damage == "swap":
    assert "differ from their checksums at save time" in message, message
  if damage == "flip":
    assert re.search("differ from their checksums at save time|cannot be read", message), message
  if damage not in ("swap", "truncate"):
    return
  # (re-running the finished run's last steps: drop what marks it finished)
  os.remove(os.path.join(workdir, "eval.json"))
  strict = run_config(**{"train.ckpt_fallback": False})
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  with pytest.raises(validate.UsageError, match="checkpoint step 6 .*train.ckpt_fallback=False"):
    train.train_and_evaluate(strict, workdir, tok, tokenizer_dir, data_dir, resume=True)
  result = train.train_and_evaluate(config, workdir, tok, tokenizer_dir, data_dir, resume=True)
  assert result["trained"] == straight[1]["trained"]
  assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", "6"))  # kept, not deleted
  assert_same(restore_state(config, workdir, 6), restore_state(config, straight[0], 6))
