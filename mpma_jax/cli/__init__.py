"""The command lines: one module per console script, each its flags plus one call into the library.

`run(main, module)` starts a command with absl, making `--help` show the command's own flags and its
docstring (usage and an example) and letting `--config` name a packaged config (`pretrain.py:tiny`,
`finetune/vqa_rad.py`) as well as a file. Every command reports an error in its input (a missing
or malformed file, a bad path or permission, a config value) as one line and exits with status 2
(`one_line_errors`); anything else is a bug and keeps its traceback.
"""
import os
import re
import sys
import traceback
from typing import Any, Callable, Optional

from absl import app, flags

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_path(value: str) -> str:
  """A --config value as a file: the value itself when that file exists, else the packaged config
  of that name (mpma_jax/configs/<name>[.py]); the ':variant' part is kept."""
  path, sep, variant = value.partition(":")
  if os.path.exists(path):
    return value
  for candidate in (path, path + ".py"):
    packaged = os.path.join(CONFIG_DIR, candidate)
    if os.path.isfile(packaged):
      return packaged + sep + variant
  return value  # the config flag's own error names it


def resolve_config_args(argv: list[str]) -> list[str]:
  """argv with every --config value passed through `config_path`."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--config" and i + 1 < len(argv):
      out += [arg, config_path(argv[i + 1])]
      i += 2
      continue
    if arg.startswith("--config="):
      arg = "--config=" + config_path(arg[len("--config="):])
    out.append(arg)
    i += 1
  return out


def simulated_device_threads(environ, cpu_count: int) -> Optional[str]:
  """PJRT_NPROC for a process that simulates more CPU devices than it has cores
  (XLA_FLAGS=--xla_force_host_platform_device_count=N), unless set: the N devices share one XLA
  thread pool of max(cores, N) threads, and on a small machine their collectives can block every
  thread for good; a larger pool leaves threads for the devices still computing."""
  found = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
  if not found or "PJRT_NPROC" in environ or int(found.group(1)) <= cpu_count:
    return None
  return str(max(32, 4 * int(found.group(1))))


COMMANDS = {  # module -> the console script's name
    "compile": "mpma-compile", "data": "mpma-data", "evaluate": "mpma-eval",
    "export": "mpma-export", "finetune": "mpma-finetune", "pretrain": "mpma-pretrain",
    "sweep": "mpma-sweep", "visualize": "mpma-visualize"
}
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_failure(error: BaseException) -> bool:
  """An error in the command's input, not a bug: a file-system error (a missing, unreadable or
  unwritable path: the exception names it), or a ValueError raised by this package's own code
  (whose messages name the file, row or field; validate.UsageError is one)."""
  if isinstance(error, OSError):
    return True
  if isinstance(error, ValueError):
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE_DIR + os.sep)
  return False


def one_line_errors(command: str, fn: Callable, *args) -> Any:
  """fn(*args); an expected failure is printed as `command: error: <message on one line>` and
  2 returned (the exit status: absl's app.run exits with what main returns)."""
  try:
    return fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    if not expected_failure(e):
      raise
    print(f"{command}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2


def run(main: Callable, module_name: str) -> None:
  """app.run(main) for the command defined in `module_name`."""
  threads = simulated_device_threads(os.environ, os.cpu_count() or 1)
  if threads:  # read when JAX creates its CPU client, i.e. later
    os.environ["PJRT_NPROC"] = threads
  module = sys.modules[module_name]
  # --help lists the key flags of the module named by sys.argv[0] (the console-script wrapper, which
  # defines none) and prints __main__'s docstring: give it the command's flags and docstring.
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  sys.modules["__main__"].__doc__ = module.__doc__
  sys.argv = resolve_config_args(sys.argv)
  spec = getattr(module, "__spec__", None)  # `python -m mpma_jax.cli.X`: __main__ is X
  command = COMMANDS.get((spec.name if spec else module_name).rpartition(".")[2], module_name)
  app.run(lambda argv: one_line_errors(command, main, argv))
