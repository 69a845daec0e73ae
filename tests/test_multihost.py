"""Multi-host training on one machine: 2 processes x 2 CPU devices (jax.distributed on 127.0.0.1,
gloo collectives) train the same steps as 1 process x 4 devices, with the same result.

XLA:CPU runs an executable's collectives one at a time, in program order; wait_all fails fast,
with every worker's stacks, should a run stop using CPU.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import train_worker
from tests.conftest import ROOT
from tests.test_checkpoint import restore_state, run_config, train_rows

pytestmark = pytest.mark.slow  # the slow tier: several training processes

# AdamW eps 1e-4: with a tiny eps Adam's early updates lr * g / (|g| + eps) turn float
# reduction-order noise in near-zero gradient entries into visible parameter differences.
STEPS = {
    "train.steps": 3, "train.ckpt_every": 3, "train.log_every": 1, "eval.num_pairs": 16,
    "eval.batch_size": 16, "optim.eps": 1e-4
}


def _env(devices: int) -> dict:
  env = dict(os.environ)  # with conftest's PJRT_NPROC: threads to spare for blocked collectives
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, tokenizer_dir, data_dir):
  single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
  single = train_worker.start(single_dir, tokenizer_dir, data_dir, STEPS, env=_env(4))
  port = _free_port()
  multi = [
      train_worker.start(multi_dir, tokenizer_dir, data_dir, STEPS, "--coordinator_address",
                         f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i),
                         env=_env(2)) for i in range(2)
  ]
  outputs = train_worker.wait_all([single, *multi], timeout=540)
  for p, out in zip([single, *multi], outputs):
    assert p.returncode == 0, out[-3000:]
  assert "2 process(es), 4 device(s)" in outputs[1]  # process 0 of the pair logs
  results = [train_worker.result_of(out) for out in outputs]
  assert results[1] == results[2]  # both hosts evaluate the same (global) model
  for key in ("trained", "untrained"):
    for k, v in results[0][key].items():
      assert abs(results[1][key][k] - v) <= 1 / 16, (key, k)  # at most one pair ranks differently

  # The same losses step by step, and the same parameters after the last step.
  single_rows, multi_rows = train_rows(single_dir), train_rows(multi_dir)
  assert [r["step"] for r in multi_rows] == [1, 2, 3]
  for a, b in zip(single_rows, multi_rows):
    for k in ("loss", "mlm", "mim", "global", "local", "grad_norm"):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=f"step {a['step']} {k}")
  config = run_config(**STEPS)
  a, b = restore_state(config, single_dir, 3), restore_state(config, multi_dir, 3)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=4e-6, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  # one copy of the data-iterator state, valid for any number of hosts
  data_state = json.load(open(os.path.join(multi_dir, "checkpoints", "3", "data", "metadata")))
  assert data_state == json.load(
      open(os.path.join(single_dir, "checkpoints", "3", "data", "metadata")))


@pytest.mark.faults
def test_sigterm_to_one_host_stops_both_at_the_same_step(tmp_path, tokenizer_dir, data_dir):
  """Preemption of one host: JAX's preemption service agrees on one step, both hosts save it
  together and exit 0."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir, port = str(tmp_path), _free_port()
  long_run = {**STEPS, "train.steps": 10_000, "train.ckpt_every": 10_000}
  procs = [
      train_worker.start(workdir, tokenizer_dir, data_dir, long_run, "--coordinator_address",
                         f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i),
                         env=_env(1)) for i in range(2)
  ]
  metrics, deadline = os.path.join(workdir, "metrics.jsonl"), time.monotonic() + 200
  while time.monotonic() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
      break
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # only the second host is told
  outputs = train_worker.wait_all(procs, timeout=200)
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:]
  stopped = [train_worker.result_of(out) for out in outputs]
  k = stopped[0]["stopped_at"]
  assert stopped[1]["stopped_at"] == k >= 3 and "SIGTERM" in stopped[0]["reason"]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(k)]


_DECIDE = """
import json, sys
from mpma_jax import distributed, train
port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.initialize_distributed(f"127.0.0.1:{port}", 2, pid)
print("DECISION " + json.dumps(train.resume_decision(workdir, "auto")), flush=True)
"""


@pytest.mark.faults
def test_resume_auto_is_decided_once_for_every_host(tmp_path):
  """--resume=auto on two hosts whose views of the workdir differ (storage still settling: host 1
  does not see the checkpoint yet): process 0 decides for both."""
  seen, unseen = tmp_path / "host0", tmp_path / "host1"
  (seen / "checkpoints" / "40").mkdir(parents=True)
  unseen.mkdir()
  port = _free_port()
  procs = [
      subprocess.Popen([sys.executable, "-c", _DECIDE,
                        str(port), str(i), str(d)], env=_env(1), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, cwd=ROOT)
      for i, d in enumerate((seen, unseen))
  ]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  decisions = [[
      json.loads(line[len("DECISION "):]) for line in out.splitlines()
      if line.startswith("DECISION ")
  ] for out in outs]
  assert all(p.returncode == 0 for p in procs), outs
  assert decisions == [[[True, 40]], [[True, 40]]], outs
