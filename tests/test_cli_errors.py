"""Every command reports an error in its input as one line naming the file or field, with exit
status 2; a bug keeps its traceback."""
import os
import subprocess
import sys

import numpy as np
import pytest

from mpma_jax import cli
from mpma_jax.data import builders


def _raise_in_package():
  builders.get("no_such_dataset")  # a ValueError raised by mpma_jax's own code


def test_expected_failures_are_input_errors_and_bugs_are_not():
  def failure(fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      return e
    raise AssertionError("no exception")

  assert cli.expected_failure(failure(_raise_in_package))
  assert cli.expected_failure(failure(lambda: open("/nonexistent/file.json")))
  # A ValueError from a library (a shape bug), a KeyError or a TypeError: bugs, with tracebacks.
  assert not cli.expected_failure(failure(lambda: np.zeros(3).reshape(2, 2)))
  assert not cli.expected_failure(failure(lambda: {}["key"]))
  assert not cli.expected_failure(failure(lambda: len(3)))


def test_one_line_errors_prints_one_line_and_returns_2(capsys):
  assert cli.one_line_errors("mpma-x", _raise_in_package) == 2
  err = capsys.readouterr().err
  assert err.startswith("mpma-x: error: unknown dataset 'no_such_dataset'")
  assert err.count("\n") == 1
  with pytest.raises(KeyError):
    cli.one_line_errors("mpma-x", lambda: {}["key"])


CASES = [  # (command line, what the one line must name)
    (["mpma-data", "build", "roco", "--manual_dir", "/nonexistent", "--data_dir",
      "/tmp/x"], "'/nonexistent' is not a directory"),
    (["mpma-data", "show", "roco", "--data_dir", "/nonexistent"], "'/nonexistent'"),
    ([
        "mpma-pretrain", "--config", "pretrain.py:tiny", "--workdir", "{tmp}/run",
        "--config.data.name=mimic_cxr", "--config.data.data_dir=/nonexistent"
    ], "'/nonexistent'"),
    ([
        "mpma-pretrain", "--config", "pretrain.py:tiny", "--workdir", "{tmp}/run",
        "--config.train.batch_size=-3"
    ], "train.batch_size"),
    ([
        "mpma-finetune", "--config", "finetune/vqa_rad.py", "--init", "/nonexistent", "--workdir",
        "{tmp}/ft", "--config.data_dir=/nonexistent"
    ], "'/nonexistent'"),
    (["mpma-eval", "--run", "/nonexistent"], "/nonexistent/config.json"),
    (["mpma-export", "--workdir", "/nonexistent", "--out",
      "{tmp}/exported"], "/nonexistent/config.json"),
    (["mpma-visualize", "--workdir", "/nonexistent"], "/nonexistent/config.json"),
    ([
        "mpma-sweep", "--config", "pretrain.py:tiny", "--workdir", "{tmp}/sweep",
        "--config.no_such_field=1"
    ], "no_such_field"),
    (["mpma-compile", "--config", "pretrain.py:tiny", "--topology", "v9:1x1"], "'v9:1x1'"),
]
MODULES = {
    "mpma-data": "data", "mpma-pretrain": "pretrain", "mpma-finetune": "finetune",
    "mpma-eval": "evaluate", "mpma-export": "export", "mpma-visualize": "visualize",
    "mpma-sweep": "sweep", "mpma-compile": "compile"
}


@pytest.mark.slow
@pytest.mark.parametrize("argv,named", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_each_command_reports_bad_input_in_one_line(tmp_path, argv, named):
  command = argv[0]
  args = [a.replace("{tmp}", str(tmp_path)) for a in argv[1:]]
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", f"mpma_jax.cli.{MODULES[command]}", *args],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  # (libtpu, where installed, adds its own warning lines; the command's own report is one line)
  own = [l for l in proc.stderr.splitlines() if l.startswith(command)]
  assert len(own) == 1 and named in own[0], proc.stderr[-3000:]
