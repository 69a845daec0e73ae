r"""mpma-sweep: run a config's sweep (sweep.py), one mpma-pretrain run per setting.

  mpma-sweep --config configs/pretrain.py:tiny --workdir ROOT [--mode local|print]
      [--launcher CMD] [--dry_run] [--config.a.b=value ...]
  mpma-sweep --config pretrain.py:base --workdir /shared/sweep --mode print \
      --launcher 'sbatch launch/slurm.sbatch' | bash

A config file declares its sweep with get_sweep(arg) (see mpma_jax/sweep.py). Every override is
checked against the config before anything runs, and every run gets ROOT/<name>, made of the fields
that vary (lr=0.00025,topk=8); ROOT/sweep.json lists the runs.

  --mode=local  runs the runs one after another (console also in <run>/run.log): a run with
                eval.json is finished and skipped, a run with checkpoints is continued with
                --resume, a failed run does not stop the others; ends with a table and exit
                code 1 if any run failed.
  --mode=print  prints one shell command per unfinished run, for a cluster or `| bash`.
  --launcher    a command taking CONFIG WORKDIR [flags...] such as every script in launch/; it
                runs in place of mpma-pretrain and decides --resume itself.
  --dry_run     prints each run's action and command; writes and runs nothing.
  --config.a.b  extra overrides fixed for every run (not part of the run names).
"""
import json
import os
import re
import sys
from typing import Callable, Optional

from absl import app, flags
from ml_collections import config_flags

from mpma_jax import cli, overrides
from mpma_jax.sweep import load_sweep, make_plan, run_local, run_logged


def parse_flags(argv: list[str]) -> Optional[flags.FlagValues]:
  """mpma-sweep's flags, parsed into a fresh FlagValues (so tests can call main repeatedly, and
  nothing clashes with mpma-pretrain's flags in the same process); None after printing --help."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file with get_sweep, e.g. "
                                  "configs/pretrain.py:tiny", flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Sweep root: one run directory per run, and sweep.json",
                      flag_values=fv)
  flags.DEFINE_enum(
      "mode", "local", ["local", "print"], "local: run the runs here one after "
      "another; print: print one command per run", flag_values=fv)
  flags.DEFINE_string(
      "launcher", "", "Command taking CONFIG WORKDIR [flags...] to launch each run "
      "with, e.g. 'sbatch launch/slurm.sbatch'", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print each run's action and command; write and run nothing",
                    flag_values=fv)
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
    print(__doc__ + "\n" + fv.get_help())
    return None
  try:
    fv(argv)
  except (AttributeError, KeyError):  # ml_collections on an unknown --config.* field
    _check_command_line_fields(argv)
    raise
  for name in ("config", "workdir"):
    if fv[name].value is None:
      raise flags.Error(f"--{name} is required")
  return fv


def _check_command_line_fields(argv: list[str]) -> None:
  """Raises ValueError naming the first --config.* flag in argv that is not a config field."""
  changes = [a for a in argv[1:] if re.match(r"-{1,2}(no)?config\.", a)]
  base = [a for a in argv if a not in changes]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=base)
  fv(base, known_only=True)
  for arg in changes:
    field = arg.split("=", 1)[0].split(".", 1)[1]
    overrides.field_parent(holder.value, field, arg.split("=", 1)[0])


def main(argv: list[str], runner: Callable[[list[str], str], int] = run_logged) -> int:
  """mpma-sweep on argv (argv[0] is the program name); returns the exit code. runner(argv,
  log_path) -> exit code runs one run in local mode (tests pass a fake)."""
  fv = parse_flags(argv)
  if fv is None:
    return 0
  config_arg, root = fv["config"].config_filename, fv["workdir"].value
  plan = make_plan(fv["config"].value, config_arg, root, dict(fv["config"].override_values),
                   load_sweep(config_arg), fv["launcher"].value)
  if fv["dry_run"].value:
    for run in plan.runs:
      print(f"{run.action:<6}  {run.command}")
    return 0
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump(plan.to_json(), f, indent=2)
  if fv["mode"].value == "print":
    for run in plan.runs:
      if run.action == "skip":
        print(f"# {run.name}: finished ({run.workdir}/eval.json), not printed", file=sys.stderr)
      else:
        print(run.command)
    return 0
  return run_local(plan, runner)


def _absl_defaults_only(argv: list[str]) -> list[str]:
  flags.FLAGS(argv[:1])  # absl's own flags (logging, pdb) at their defaults
  return argv  # main parses all of argv into its own FlagValues


def run():
  def _main(argv):
    try:  # a bad sweep or override: its one-line message names it
      return cli.one_line_errors("mpma-sweep", main, argv)
    except flags.Error as e:
      print(f"mpma-sweep: {e}; see mpma-sweep --help", file=sys.stderr)
      return 2

  sys.argv = cli.resolve_config_args(sys.argv)
  app.run(_main, flags_parser=_absl_defaults_only)


if __name__ == "__main__":
  run()
