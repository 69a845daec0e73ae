"""The command lines: every console script's --help lists its own flags and an example; the
package's import graph has no cycle and only mpma_jax/cli/ defines flags; a non-editable install
works from outside the checkout (slow tier)."""
import ast
import configparser
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def console_scripts() -> dict[str, str]:
  """{script name: 'module:function'} from setup.cfg."""
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
  return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def own_flags(module: str) -> list[str]:
  """The flags a command module defines (absl DEFINE_* calls, or argparse sub-commands)."""
  path = os.path.join(ROOT, *module.split(".")) + ".py"
  with open(path) as f:
    tree = ast.parse(f.read())
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      if node.func.attr.startswith("DEFINE") and node.args and isinstance(
          node.args[0], ast.Constant):
        names.append("--" + node.args[0].value)
      elif node.func.attr == "add_parser" and node.args:  # argparse sub-command
        names.append(node.args[0].value)
  return names


def test_every_console_script_lives_in_cli_and_documents_its_flags():
  scripts = console_scripts()
  assert len(scripts) == 8
  bin_dir = os.path.dirname(sys.executable)
  procs = {}
  for name, target in scripts.items():
    module = target.split(":")[0]
    assert module.startswith("mpma_jax.cli."), (name, target)
    procs[name] = (module,
                   subprocess.Popen([os.path.join(bin_dir, name), "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
  for name, (module, proc) in procs.items():
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode in (0, 1) and "Traceback" not in out, (name, out[-2000:])  # absl: 1
    flags = own_flags(module)
    assert len(flags) >= 2, (name, flags)
    for flag in flags:
      assert flag in out, f"{name} --help does not list {flag}"
    # the module docstring's usage, with at least one example command line
    assert any(line.strip().startswith(name + " ") for line in out.splitlines()), (name, out[:800])
    assert "Try --helpfull" not in out.split("flags:")[0], name


def test_import_graph_has_no_cycle_and_flags_live_in_cli():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "import_graph.py")], capture_output=True,
      text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  graph = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
  assert "0 layering problems" in proc.stderr
  # the layers: the library never reaches up into the commands, the model never into training
  graph = {module: targets.split(", ") for module, targets in graph.items()}
  for module, targets in graph.items():
    if not module.startswith("cli"):
      assert not any(t.startswith("cli") for t in targets), module
    if module.startswith("models"):
      assert not any(t in ("train", "finetune", "checkpoint", "logger") for t in targets), module
  assert "train" in graph["cli.pretrain"] and "finetune" in graph["cli.finetune"]


def test_import_graph_finds_a_cycle(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  try:
    import import_graph  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  assert import_graph.cycles({"a": ["b"], "b": ["c"], "c": ["a"],
                              "d": ["a"]}) == [["a", "b", "c", "a"]]
  assert import_graph.cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_config_names_resolve_to_packaged_configs(tmp_path):
  from mpma_jax import cli  # pylint: disable=g-import-not-at-top
  packaged = os.path.join(cli.CONFIG_DIR, "pretrain.py")
  assert cli.config_path("pretrain.py:tiny") == packaged + ":tiny"
  assert cli.config_path("pretrain:tiny") == packaged + ":tiny"
  assert cli.config_path("finetune/vqa_rad") == os.path.join(cli.CONFIG_DIR, "finetune",
                                                             "vqa_rad.py")
  own = tmp_path / "pretrain.py"  # an existing file wins over the packaged one of that name
  own.write_text("")
  assert cli.config_path(f"{own}:base") == f"{own}:base"
  assert cli.resolve_config_args(
      ["x", "--config", "pretrain:tiny", "--config=finetune/slake", "--workdir", "w"]) == [
          "x", "--config", packaged + ":tiny",
          "--config=" + os.path.join(cli.CONFIG_DIR, "finetune", "slake.py"), "--workdir", "w"
      ]


@pytest.mark.slow
def test_non_editable_install_works_outside_the_checkout(tmp_path):
  """pip install (not -e) of the project into a directory, then its console scripts and the
  suite's task configs from a directory that is not the checkout."""
  target, source = tmp_path / "site", tmp_path / "source"
  # a copy, so that the build's own files (build/, *.egg-info) stay out of the checkout
  shutil.copytree(
      ROOT, source, symlinks=True,
      ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                    ".pytest_cache"))
  subprocess.run([
      sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
      str(target),
      str(source)
  ], check=True, capture_output=True, text=True, timeout=600)
  assert (target / "mpma_jax" / "configs" / "finetune" / "vqa_rad.py").exists()
  env = dict(os.environ, PYTHONPATH=str(target))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=elsewhere,
                                    timeout=300)
  where = run(sys.executable, "-c", "import mpma_jax; print(mpma_jax.__file__)")
  assert where.stdout.strip().startswith(str(target)), where
  listed = run(str(target / "bin" / "mpma-data"), "list")
  assert listed.returncode == 0 and "vqa_rad" in listed.stdout, listed.stderr[-1000:]
  helped = run(str(target / "bin" / "mpma-pretrain"), "--help")
  assert "--workdir" in helped.stdout and "Traceback" not in helped.stderr, helped.stderr[-1000:]
  tasks = run(
      sys.executable, "-c", "from mpma_jax import suite\n"
      "for name, variant in suite.SUITE:\n"
      "  c = suite.load_task_config(name, variant)\n"
      "  assert c.dataset and c.task, (name, variant)\n"
      "print(len(suite.SUITE), suite.CONFIG_DIR)")
  assert tasks.returncode == 0, tasks.stderr[-2000:]
  count, config_dir = tasks.stdout.split()
  assert int(count) >= 10 and config_dir.startswith(str(target))
  # a packaged config by name, from anywhere
  dry = run(str(target / "bin" / "mpma-sweep"), "--config", "pretrain.py:tiny", "--workdir",
            str(tmp_path / "sweep"), "--dry_run")
  assert dry.returncode == 0 and "mpma-pretrain" in dry.stdout, dry.stderr[-1000:]


@pytest.mark.faults
def test_simulated_devices_get_a_thread_pool_when_they_outnumber_the_cores():
  from mpma_jax import cli  # pylint: disable=g-import-not-at-top
  flags8 = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"}
  assert cli.simulated_device_threads(flags8, cpu_count=2) == "32"
  assert cli.simulated_device_threads({"XLA_FLAGS": "--xla_force_host_platform_device_count=16"},
                                      cpu_count=4) == "64"
  assert cli.simulated_device_threads(flags8, cpu_count=8) is None  # enough cores
  assert cli.simulated_device_threads({**flags8, "PJRT_NPROC": "12"}, cpu_count=2) is None
  assert cli.simulated_device_threads({}, cpu_count=2) is None


@pytest.mark.faults
@pytest.mark.slow
def test_sigterm_during_setup_stops_with_one_line(tmp_path):
  """SIGTERM while mpma-pretrain prepares the run (here: generating the synthetic set) ends it
  with a message naming what to do, not a bare 143."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  proc = subprocess.Popen([
      sys.executable, "-m", "mpma_jax.cli.pretrain", "--config", "configs/pretrain.py:tiny",
      "--workdir",
      str(workdir), "--config.data.num_train=200000"
  ], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while not workdir.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  time.sleep(1.0)  # inside the data generation
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 143, err[-2000:]
  assert err.strip().splitlines()[-1].startswith("mpma-pretrain: stopped by SIGTERM outside the "
                                                 "training loop"), err[-2000:]
  assert "Traceback" not in err
