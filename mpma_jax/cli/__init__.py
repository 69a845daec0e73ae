"""The command lines: one module per console script, each its flags plus one call into the library.

`run(main, module)` starts a command with absl, making `--help` show the command's own flags and its
docstring (usage and an example) and letting `--config` name a packaged config (`pretrain.py:tiny`,
`finetune/vqa_rad.py`) as well as a file.
"""
import os
import re
import sys
from typing import Callable, Optional

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
  app.run(main)
