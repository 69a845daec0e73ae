"""launch/*: bash syntax, and each launcher's logic with a stand-in for mpma-pretrain, srun, gcloud
(the real multi-process training test is in test_train.py)."""
import os
import shlex
import stat
import subprocess
import time

import pytest

from tests.conftest import ROOT

LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["local.sh", "multiprocess.sh", "slurm.sbatch", "tpu_pod.sh"]

# Stand-in for mpma-pretrain: logs its arguments and device settings; process FAIL_ID exits 3,
# the others sleep SLEEP seconds (exec, so that SIGTERM ends them at once).
FAKE_PRETRAIN = r"""#!/usr/bin/env bash
echo "args: $*"
echo "env: JAX_PLATFORMS=${JAX_PLATFORMS:-} XLA_FLAGS=${XLA_FLAGS:-}"
for a in "$@"; do case $a in --process_id=*) id=${a#*=};; esac; done
if [ "${FAIL_ID:-none}" = "${id:-}" ]; then exit 3; fi
exec sleep "${SLEEP:-0}"
"""


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse_are_executable_and_start_with_usage(name):
  path = os.path.join(LAUNCH, name)
  subprocess.run(["bash", "-n", path], check=True)
  assert os.stat(path).st_mode & stat.S_IXUSR
  lines = open(path).read().splitlines()
  assert lines[0] == "#!/usr/bin/env bash" and "CONFIG WORKDIR" in "\n".join(lines[1:4])
  assert "set -euo pipefail" in lines


def _multiprocess(tmp_path, n, workdir, *flags, **env):
  fake = _executable(tmp_path / "fake_pretrain", FAKE_PRETRAIN)
  env = {
      **os.environ, "MPMA_PRETRAIN": fake, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
      "KILL_AFTER": "5", **env
  }
  return subprocess.run(
      [os.path.join(LAUNCH, "multiprocess.sh"),
       str(n), "cfg.py:tiny",
       str(workdir), *flags], env=env, capture_output=True, text=True, timeout=60)


def test_multiprocess_starts_n_processes_with_their_ids_and_devices(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "5").mkdir(parents=True)
  result = _multiprocess(tmp_path, 3, workdir, "--config.seed=1", DEVICES_PER_PROCESS="2")
  assert result.returncode == 0, result.stderr
  coordinators = set()
  for i in range(3):
    args, env = (workdir / "logs" / f"process_{i}.log").read_text().splitlines()
    argv = shlex.split(args[len("args: "):])
    assert argv[:5] == ["--config", "cfg.py:tiny", "--workdir", str(workdir), "--resume=auto"]
    assert argv[6:] == ["--num_processes=3", f"--process_id={i}", "--config.seed=1"]
    coordinators.add(argv[5])
    assert env.split() == [
        "env:", "JAX_PLATFORMS=cpu", "XLA_FLAGS=", "--xla_force_host_platform_device_count=2"
    ]
  (coordinator,) = coordinators  # one coordinator for all
  assert coordinator.startswith("--coordinator_address=127.0.0.1:")


def test_multiprocess_splits_the_gpus(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\nprintf '0\\n1\\n2\\n3\\n'\n")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")}
  fake = _executable(tmp_path / "fake_pretrain",
                     "#!/usr/bin/env bash\necho \"$CUDA_VISIBLE_DEVICES ${JAX_PLATFORMS:-}\"\n")
  env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", MPMA_PRETRAIN=fake)

  def run(n, **more_env):
    return subprocess.run(
        [os.path.join(LAUNCH, "multiprocess.sh"),
         str(n), "c.py",
         str(tmp_path / "run")], env={**env,
                                      **more_env}, capture_output=True, text=True, timeout=60)

  assert run(2).returncode == 0
  logs = [(tmp_path / "run" / "logs" / f"process_{i}.log").read_text().strip() for i in range(2)]
  assert logs == ["0,1", "2,3"]  # and JAX_PLATFORMS left alone
  assert run(2, CUDA_VISIBLE_DEVICES="5,7").returncode == 0  # a split of the visible ones
  assert (tmp_path / "run" / "logs" / "process_1.log").read_text().strip() == "7"
  result = run(3)
  assert result.returncode == 2 and "do not split evenly into 3" in result.stderr


def test_multiprocess_stops_the_others_when_one_fails(tmp_path):
  start = time.monotonic()
  result = _multiprocess(tmp_path, 2, tmp_path / "run", FAIL_ID="1", SLEEP="60")
  assert result.returncode == 3  # the failed process's code
  assert time.monotonic() - start < 30  # process 0 was stopped, not waited for
  assert "process 1 exited with 3" in result.stderr
  assert "--resume=auto" in (tmp_path / "run" / "logs" / "process_0.log").read_text()


def _slurm(tmp_path, workdir, srun_body):
  """Runs launch/slurm.sbatch as SLURM would, with srun and scontrol replaced by stand-ins."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  _executable(bin_dir / "srun", "#!/usr/bin/env bash\necho \"$*\" >> \"$CALLS\"\n" + srun_body)
  _executable(bin_dir / "scontrol", "#!/usr/bin/env bash\necho \"scontrol $*\" >> \"$CALLS\"\n")
  calls = tmp_path / "calls"
  calls.write_text("")
  env = {
      **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
      "SLURM_JOB_ID": "42", "WORKDIR": str(workdir)
  }
  result = subprocess.run([
      "bash",
      os.path.join(LAUNCH, "slurm.sbatch"), "cfg.py:base",
      str(workdir), "--config.seed=1"
  ], env=env, capture_output=True, text=True, timeout=60)
  return result.returncode, calls.read_text().splitlines()


def test_slurm_resumes_and_requeues_only_after_progress(tmp_path):
  workdir = tmp_path / "run"
  # stopped at the time limit after a new checkpoint: requeue
  rc, calls = _slurm(tmp_path, workdir, 'mkdir -p "$WORKDIR/checkpoints/100"\n')
  assert rc == 0
  assert calls == [
      f"--kill-on-bad-exit=1 mpma-pretrain --config cfg.py:base --workdir {workdir} "
      "--resume=auto --config.seed=1", "scontrol requeue 42"
  ]
  # the requeued job resumes; it finishes (eval.json): no requeue
  rc, calls = _slurm(tmp_path, workdir, 'mkdir -p "$WORKDIR/checkpoints/200"\n'
                     'touch "$WORKDIR/eval.json"\n')
  assert rc == 0 and len(calls) == 1 and "--workdir {} --resume=auto".format(workdir) in calls[0]
  # a failure, or a stop without a new checkpoint, is not requeued
  (workdir / "eval.json").unlink()
  rc, calls = _slurm(tmp_path, workdir, "exit 1\n")
  assert rc == 1 and len(calls) == 1
  rc, calls = _slurm(tmp_path, workdir, "exit 0\n")
  assert rc == 0 and len(calls) == 1


def test_tpu_pod_command_reaches_every_worker_unchanged(tmp_path):
  """The --command string given to gcloud, run by a shell, passes every argument through."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "gcloud", '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$CALLS"\n')
  _executable(bin_dir / "mpma-pretrain", '#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
  repo = tmp_path / "repo"
  (repo / ".venv" / "bin").mkdir(parents=True)
  (repo / ".venv" / "bin" / "activate").write_text("")
  env = {
      **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "c"),
      "REPO_DIR": str(repo)
  }
  flags = [
      "--config.optim.encoder_modules=('image_encoder', 'text encoder')",
      "--config.data.name=roco:1,medicat:1"
  ]
  script = os.path.join(LAUNCH, "tpu_pod.sh")
  subprocess.run(
      [script, "my-tpu", "us-central2-b", "configs/pretrain.py:base", "gs://b/run", *flags],
      env=env, check=True, capture_output=True, timeout=60)
  gcloud = (tmp_path / "c").read_text().splitlines()
  assert gcloud[:8] == [
      "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b", "--worker=all"
  ]
  assert gcloud[8] == "--command"
  remote = "\n".join(gcloud[9:])
  worker = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True,
                          check=True)
  assert worker.stdout.splitlines() == [
      "--config", "configs/pretrain.py:base", "--workdir", "gs://b/run", "--resume=auto", *flags
  ]
  relative = subprocess.run([script, "t", "z", "c.py", "runs/x"], env=env, capture_output=True,
                            text=True)
  assert relative.returncode == 2 and "shared mount" in relative.stderr
