"""Checks before work: one validation of the whole config (a test per rule), a resume that would
change what the checkpoints hold, and nothing written when a command is refused."""
import hashlib
import os
import subprocess
import sys

import pytest

from mpma_jax import checkpoint, train, validate
from tests.conftest import ROOT, tiny_config


@pytest.mark.faults
@pytest.mark.parametrize("field, value, expected", [
    ("model.image.size", 60, "model.image.size=60: must be divisible by model.image.patch=8"),
    ("model.image.heads", 3, "model.image.width=64: must be divisible by model.image.heads=3"),
    ("train.batch_size", 0, "train.batch_size=0: expected a positive number"),
    ("train.batch_size", -4, "train.batch_size=-4: expected a positive number"),
    ("train.ckpt_every", 0, "train.ckpt_every=0: expected a positive number"),
    ("train.grad_accum", 3, "train.batch_size=8: must be divisible by train.grad_accum=3"),
    ("train.nonfinite", "ignore", "train.nonfinite='ignore': expected one of 'skip', 'stop'"),
    ("train.max_nonfinite_total", -1, "train.max_nonfinite_total=-1: expected a number >= 0"),
    ("model.gla.local", "dot", "model.gla.local='dot': expected one of 'filip', 'attention'"),
    ("model.dtype", "float16", "model.dtype='float16': expected one of"),
    ("model.remat", "some", "model.remat='some': expected one of"),
    ("masking.image_ratio", 1.0, "masking.image_ratio=1.0: expected a fraction in [0, 1)"),
    ("model.mim.layer", 5, "model.mim.layer=5: expected a fusion layer, 1..model.fusion.layers=2"),
    ("model.memory.topk", 1000, "model.memory.topk=1000: expected at most model.memory.slots"),
    ("data.name", "rocco", "unknown dataset 'rocco'"),
    ("data.max_len", 0, "data.max_len=0: expected a positive number"),
    ("data.max_len", 65, "data.max_len=65: longer than the text encoder reads: "
     "model.text.max_positions=64 (bert positions) takes at most 64 tokens"),
    ("eval.num_pairs", 0, "eval.num_pairs=0: expected a positive number"),
])
def test_each_rule_names_field_value_and_expectation(field, value, expected):
  config = tiny_config()
  assert validate.problems(config, 8) == []
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  found = validate.problems(config, 8)
  assert len(found) == 1 and expected in found[0], found
  with pytest.raises(validate.UsageError, match="invalid config"):
    validate.check(config, 8)


def test_mesh_and_batch_against_the_devices():
  config = tiny_config()
  config.mesh.update(data=3, fsdp=1, tensor=1)
  assert "mesh:" in validate.problems(config, 8)[0]
  config.mesh.update(data=-1)
  config.train.batch_size = 12  # 12 rows over 8 data-parallel devices
  assert validate.problems(config, 8) == [
      "train.batch_size=12: the micro-batch (train.batch_size / train.grad_accum = 12) must be "
      "divisible by the 8 data x fsdp devices"
  ]
  assert validate.problems(config, 4) == []


def test_resume_differences_name_the_fields_that_matter():
  saved, now = tiny_config(), tiny_config()
  now.model.text.width = 256
  now.data.name = "mimic_cxr"
  now.train.steps = 50  # a longer or shorter run is a resume, not a change
  now.mesh.fsdp = 2
  assert validate.resume_differences(
      saved, now) == ["data.name: 'synthetic' -> 'mimic_cxr'", "model.text.width: 64 -> 256"]


def _tree_digest(path) -> dict:
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _fake_run(workdir, config):
  """A run directory as mpma-pretrain leaves it: config.json and a checkpoint step."""
  os.makedirs(os.path.join(workdir, "checkpoints", "20", "state"))
  with open(os.path.join(workdir, "checkpoints", "20", "state", "x"), "w") as f:
    f.write("arrays")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


@pytest.mark.faults
def test_refused_commands_leave_the_workdir_byte_for_byte(tmp_path):
  workdir = str(tmp_path / "run")
  _fake_run(workdir, tiny_config())
  before = _tree_digest(workdir)
  # a start without --resume on a workdir with checkpoints
  with pytest.raises(validate.UsageError, match="already holds checkpoints"):
    train.pretrain(tiny_config(), workdir)
  # a resume that changes the model
  wider = tiny_config()
  wider.model.text.width = 256
  with pytest.raises(validate.UsageError, match=r"model.text.width: 64 -> 256"):
    train.pretrain(wider, workdir, resume=True)
  # a bad value
  bad = tiny_config()
  bad.train.batch_size = 0
  with pytest.raises(validate.UsageError, match="train.batch_size=0"):
    train.pretrain(bad, workdir, resume=True)
  assert _tree_digest(workdir) == before
  assert checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == 20


@pytest.mark.faults
def test_a_refused_start_creates_no_workdir(tmp_path):
  config = tiny_config()
  config.model.image.size = 60
  with pytest.raises(validate.UsageError, match="model.image.size=60"):
    train.pretrain(config, str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")


@pytest.mark.faults
@pytest.mark.slow
def test_the_command_prints_one_line_and_exits_2(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run([
      sys.executable, "-m", "mpma_jax.cli.pretrain", "--config", "configs/pretrain.py:tiny",
      "--workdir",
      str(workdir), "--config.train.batch_size=0"
  ], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("mpma-pretrain: invalid config: train.batch_size=0")
  assert "Traceback" not in proc.stderr and not workdir.exists()
  missing = subprocess.run([
      sys.executable, "-m", "mpma_jax.cli.pretrain", "--config",
      str(tmp_path / "nope.py"), "--workdir",
      str(workdir)
  ], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert missing.returncode != 0 and not workdir.exists()


@pytest.mark.faults
def test_resume_auto_continues_when_there_is_a_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  assert train.resume_decision(workdir, "auto") == (False, None)  # nothing there: start
  assert train.resume_decision(workdir, False) == (False, None)
  os.makedirs(os.path.join(workdir, "checkpoints", "20"))
  os.makedirs(os.path.join(workdir, "checkpoints", "30.orbax-checkpoint-tmp-1"))  # unfinished
  assert train.resume_decision(workdir, "auto") == (True, 20)
  assert train.resume_decision(workdir, True) == (True, 20)
  with pytest.raises(validate.UsageError, match="expected true, false or auto"):
    train.resume_decision(workdir, "maybe")


def test_the_resume_flag_takes_true_false_and_auto():
  from absl import flags  # pylint: disable=g-import-not-at-top

  from mpma_jax.cli import pretrain as cli_pretrain  # pylint: disable=g-import-not-at-top
  parser = cli_pretrain._ResumeParser()  # pylint: disable=protected-access
  fv = flags.FlagValues()
  flags.DEFINE_flag(
      flags.Flag(parser, flags.ArgumentSerializer(), "resume", "false", "", boolean=True), fv)
  for argv, want in ((["x"], "false"), (["x", "--resume"], "true"), (["x", "--noresume"], "false"),
                     (["x", "--resume=auto"], "auto"), (["x", "--resume=True"], "true")):
    fv.unparse_flags()
    fv(argv)
    assert fv.resume == want, argv
  fv.unparse_flags()
  with pytest.raises(flags.IllegalFlagValueError):
    fv(["x", "--resume=sometimes"])
