"""`mpma-sweep --config configs/pretrain.py:tiny --workdir ROOT [--mode local|print]
[--launcher CMD] [--dry_run] [--config.a.b=value ...]`

A config file declares a sweep with `get_sweep(arg)` (arg: the text after ':' in --config, as for
get_config) returning a list of override dicts {dotted.field: value}, built with the combinators
below:

  def get_sweep(variant="tiny"):
    from mpma_jax.sweep import chain, fixed, product, sweep
    return chain(product(sweep("optim.lr", [2.5e-4, 5e-4]), sweep("model.memory.topk", [8, 16])),
                 fixed("model.memory.enabled", False))

Every override is checked against the config before anything runs (an unknown field or a value of
the wrong type names the field and the run), and every run gets ROOT/<name>, a name made of the
fields that vary across the sweep (`lr=0.00025,topk=8`). ROOT/sweep.json lists the runs.

  --mode=local  runs the runs one after another (`mpma-pretrain ...`, console also in
                <run>/run.log): a run with eval.json is finished and skipped, a run with
                checkpoints is continued with --resume, a failed run does not stop the others.
                Ends with a table (run, status, i2t_r5) and exit code 1 if any run failed.
  --mode=print  prints one shell command per unfinished run, for a cluster or `| bash`.
  --launcher    a command taking `CONFIG WORKDIR [flags...]` such as every script in launch/
                (`'sbatch launch/slurm.sbatch'`, `'launch/multiprocess.sh 2'`); it then runs in
                place of `mpma-pretrain --config CONFIG --workdir WORKDIR` and decides --resume
                itself.
  --dry_run     prints each run's action and command; writes and runs nothing.
  --config.a.b  extra overrides fixed for every run (not part of the run names).
"""
import copy
import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Callable, Optional, Sequence

from absl import app, flags
import ml_collections
from ml_collections import config_flags

Overrides = dict[str, Any]  # dotted config field -> value

# --- declaring a sweep ---------------------------------------------------------------------------


def sweep(field: str, values: Sequence[Any]) -> list[Overrides]:
  """One run per value: [{field: v} for v in values]."""
  if isinstance(values, (str, bytes)) or not values:
    raise ValueError(f"sweep({field!r}, ...) needs a non-empty list of values, got {values!r}")
  return [{field: v} for v in values]


def fixed(field: str, value: Any) -> list[Overrides]:
  """A single run setting field to value (to combine with product, or as an ablation in chain)."""
  return [{field: value}]


def _merge(overrides: Sequence[Overrides], who: str) -> Overrides:
  run = {}
  for o in overrides:
    for field in o.keys() & run.keys():
      raise ValueError(f"{who}: field {field!r} is set by more than one sweep")
    run.update(o)
  return run


def product(*sweeps: list[Overrides]) -> list[Overrides]:
  """Every combination of one run from each sweep; the last sweep varies fastest."""
  return [_merge(combo, "product()") for combo in itertools.product(*sweeps)]


def zip_(*sweeps: list[Overrides]) -> list[Overrides]:
  """The i-th runs of all sweeps merged into one run (sweeps of equal length), e.g. learning rates
  paired with warm-ups instead of crossed with them."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f"zip_() needs sweeps of equal length, got lengths {lengths}")
  return [_merge(group, "zip_()") for group in zip(*sweeps)]


def chain(*sweeps: list[Overrides]) -> list[Overrides]:
  """The runs of each sweep one after another (e.g. a grid, then ablations)."""
  return [dict(run) for s in sweeps for run in s]


# --- names ---------------------------------------------------------------------------------------


def _name_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return "-".join(_name_value(v) for v in value)
  return repr(value) if isinstance(value, float) else str(value)


def _short_labels(fields: list[str]) -> dict[str, str]:
  """Each field's shortest dotted suffix that no other field shares (`lr`, `image.layers`)."""
  labels = {}
  for field in fields:
    parts = field.split(".")
    for k in range(1, len(parts) + 1):
      label = ".".join(parts[-k:])
      if all(".".join(g.split(".")[-k:]) != label for g in fields if g != field):
        break
    labels[field] = label
  return labels


def run_names(runs: list[Overrides]) -> list[str]:
  """Readable, filesystem-safe, unique directory names from the fields whose values vary across
  the runs (all fields for a single run), e.g. `lr=0.0001,topk=8`."""
  fields = list(dict.fromkeys(f for run in runs for f in run))  # first-appearance order
  missing = object()
  varying = [f for f in fields if len(runs) == 1 or
             len({repr(run.get(f, missing)) for run in runs}) > 1]
  labels = _short_labels(fields)  # unique among all fields, so `image.layers` stays clear
  names, seen = [], set()
  for run in runs:
    name = ",".join(f"{labels[f]}={_name_value(run[f])}" for f in varying if f in run) or "default"
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > 120:  # stay well under the 255-byte limit on a path component
      name = name[:110] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    base, i = name, 2
    while name in seen:  # only when sanitising made two names equal
      name, i = f"{base}_{i}", i + 1
    seen.add(name)
    names.append(name)
  return names


# --- checking overrides against the config -------------------------------------------------------


def _field_parent(config: ml_collections.ConfigDict, field: str, where: str):
  """(the ConfigDict holding field, its last name); ValueError naming `where` if there is none."""
  parts = field.split(".")
  node = config
  for i, part in enumerate(parts):
    path = ".".join(parts[:i]) or "the config"
    if not isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f"{where}: unknown config field {field!r}: {path} is a "
                       f"{type(node).__name__}, not a group of fields")
    if part not in node:
      known = sorted(node.keys())
      close = difflib.get_close_matches(part, known, n=1)
      hint = (f"did you mean {'.'.join(parts[:i] + close)!r}?" if close else
              f"{path} has: {', '.join(known)}")
      raise ValueError(f"{where}: unknown config field {field!r} ({path} has no {part!r}; {hint})")
    if i < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def apply_override(config: ml_collections.ConfigDict, field: str, value: Any, where: str) -> Any:
  """Sets config.<field> = value in place; returns the value as the config stores it (an int given
  for a float field becomes a float). Raises ValueError naming `where` and the field on an unknown
  field or a value of the wrong type."""
  node, leaf = _field_parent(config, field, where)
  old = node[leaf]
  if isinstance(old, ml_collections.ConfigDict):
    raise ValueError(f"{where}: {field} is a group of fields, not a value; override its fields "
                     f"({', '.join(f'{field}.{k}' for k in old.keys())})")
  # ConfigDict lets a bool into an int field (bool is an int), but `--config.x=True` then fails
  if isinstance(value, bool) and old is not None and not isinstance(old, bool):
    raise ValueError(f"{where}: {field}={value!r} is a bool but the config holds a "
                     f"{type(old).__name__} ({old!r})")
  try:
    node[leaf] = value
  except TypeError:
    raise ValueError(f"{where}: {field}={value!r} is a {type(value).__name__} but the config holds "
                     f"a {type(old).__name__} ({old!r})") from None
  return node[leaf]


def flag_value(value: Any) -> str:
  """The text that ml_collections' `--config.field=TEXT` parses back to value."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))  # parsed with ast.literal_eval
  return str(value)


def override_flags(overrides: Overrides) -> list[str]:
  return [f"--config.{field}={flag_value(value)}" for field, value in overrides.items()]


def _check_round_trip(config_arg: str, overrides: Overrides, where: str) -> None:
  """Parses the run's --config flags exactly as mpma-pretrain will and checks that every field
  comes back with its value, so that no run fails on the cluster after waiting in the queue."""
  argv = ["mpma-pretrain", "--config", config_arg, *override_flags(overrides)]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  try:
    fv(argv)
  except flags.Error as e:
    raise ValueError(f"{where}: its command line does not parse: {e}") from None
  for field, value in overrides.items():
    got = holder.value
    for part in field.split("."):
      got = got[part]
    if got != value or type(got) is not type(value):
      raise ValueError(f"{where}: {field}={value!r} does not survive the command line: "
                       f"--config.{field}={flag_value(value)} parses back as {got!r}")


# --- expanding a sweep into runs -----------------------------------------------------------------


@dataclasses.dataclass
class Run:
  name: str
  workdir: str
  overrides: Overrides  # this run's own overrides (the sweep's fixed ones are in Plan.fixed)
  action: str = "start"  # start | resume | skip (eval.json present)
  argv: list[str] = dataclasses.field(default_factory=list)

  @property
  def command(self) -> str:
    return shlex.join(self.argv)


@dataclasses.dataclass
class Plan:
  config: str  # the --config argument, e.g. configs/pretrain.py:tiny
  root: str
  fixed: Overrides  # extra --config.* overrides given to mpma-sweep, applied to every run
  runs: list[Run]

  def to_json(self) -> dict:
    return {"config": self.config, "root": self.root, "fixed": self.fixed,
            "runs": [{"name": r.name, "workdir": r.workdir, "overrides": r.overrides,
                      "action": r.action, "command": r.command} for r in self.runs]}


def load_sweep(config_arg: str) -> list[Overrides]:
  """Calls get_sweep(arg) of the config file named by `path.py[:arg]`; returns its runs."""
  path, *arg = config_arg.split(":", 1)
  spec = importlib.util.spec_from_file_location("mpma_sweep_config", path)
  if spec is None:
    raise ValueError(f"--config {config_arg}: {path} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(arg): a sweep config returns a list of "
                     "{dotted.field: value} dicts (see mpma_jax/sweep.py)")
  runs = module.get_sweep(*arg)
  call = f"get_sweep({', '.join(map(repr, arg))}) in {path}"
  if not isinstance(runs, (list, tuple)) or not runs:
    raise ValueError(f"{call} must return a non-empty list of override dicts, got {runs!r}")
  for i, run in enumerate(runs):
    if not isinstance(run, dict) or not all(isinstance(k, str) for k in run):
      raise ValueError(f"{call}: run #{i + 1} is {run!r}, expected a {{dotted.field: value}} dict")
  return [dict(run) for run in runs]


def run_state(workdir: str) -> str:
  """skip (eval.json: finished), resume (checkpoints: interrupted) or start."""
  if os.path.exists(os.path.join(workdir, "eval.json")):
    return "skip"
  ckpt = os.path.join(workdir, "checkpoints")
  return "resume" if os.path.isdir(ckpt) and os.listdir(ckpt) else "start"


def make_plan(config: ml_collections.ConfigDict, config_arg: str, root: str, fixed_: Overrides,
              runs: list[Overrides], launcher: str = "") -> Plan:
  """Checks every run's overrides against config (which already holds `fixed_`), names the runs,
  reads each workdir's state and builds each run's command. Raises ValueError on a bad run."""
  runs = [dict(run) for run in runs]  # values are normalised in place below
  for i, (name, run) in enumerate(zip(run_names(runs), runs)):
    for j in range(i):
      if runs[j] == run:
        raise ValueError(f"runs #{j + 1} and #{i + 1} of the sweep are the same: {run}")
    where = f"run {name!r} (#{i + 1} of {len(runs)})"
    for field in run.keys() & fixed_.keys():
      raise ValueError(f"{where}: {field} is swept by get_sweep and also fixed by "
                       f"--config.{field}; drop one")
    trial = copy.deepcopy(config)
    for field, value in run.items():
      run[field] = apply_override(trial, field, value, where)
    _check_round_trip(config_arg, {**fixed_, **run}, where)

  names = run_names(runs)  # from the normalised values (an int given for a float names as 1.0)
  plan = Plan(config_arg, root, fixed_, [])
  for name, run in zip(names, runs):
    workdir = os.path.join(root, name)
    action = run_state(workdir)
    flags_ = override_flags({**fixed_, **run})
    if launcher:  # the launcher decides --resume itself (launch/*.sh look at the checkpoints)
      argv = [*shlex.split(launcher), config_arg, workdir, *flags_]
    else:
      resume = ["--resume"] if action == "resume" else []
      argv = ["mpma-pretrain", "--config", config_arg, "--workdir", workdir, *resume, *flags_]
    plan.runs.append(Run(name, workdir, run, action, argv))
  return plan


# --- running -------------------------------------------------------------------------------------


def run_logged(argv: list[str], log_path: str) -> int:
  """Runs argv, its output to the console and appended to log_path; returns the exit code."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  # mpma-pretrain (also when a launcher calls it) from this interpreter's environment, even when
  # the virtualenv is not activated
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, "a") as log, subprocess.Popen(
      argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
    for line in proc.stdout:
      sys.stdout.write(line)
      log.write(line)
      log.flush()
  return proc.returncode


def latest_step(workdir: str) -> Optional[int]:
  """The newest checkpoint's step in <workdir>/checkpoints/<step>/, or None."""
  ckpt = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
  return max(steps, default=None)


def i2t_r5(workdir: str) -> Optional[float]:
  """The trained model's image->text R@5 from <workdir>/eval.json, or None."""
  try:
    with open(os.path.join(workdir, "eval.json")) as f:
      return float(json.load(f)["trained"]["i2t_r5"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def run_local(plan: Plan, runner: Callable[[list[str], str], int]) -> int:
  """Runs the plan's unfinished runs in order and prints a summary. Returns 1 if any run failed
  (a run that stopped early and cleanly, e.g. at train.run_steps, is not a failure), 130 when
  interrupted, else 0."""
  statuses = {}
  try:
    for i, run in enumerate(plan.runs):
      if run.action == "skip":
        statuses[run.name] = "finished before"
        continue
      print(f"=== [{i + 1}/{len(plan.runs)}] {run.name}: {run.action}\n{run.command}", flush=True)
      statuses[run.name] = "interrupted"
      rc = runner(run.argv, os.path.join(run.workdir, "run.log"))
      resumed = " (resumed)" if run.action == "resume" else ""
      if rc != 0:
        statuses[run.name] = f"failed (exit {rc}){resumed}"
      elif run_state(run.workdir) != "skip":  # a clean early stop: SIGTERM, train.run_steps
        step = latest_step(run.workdir)
        statuses[run.name] = (f"stopped at step {step}" if step is not None else
                              "ended without eval.json")
      else:
        statuses[run.name] = f"ok{resumed}"
  except KeyboardInterrupt:
    pass  # the summary still shows what ran
  rows = [("run", "status", "i2t_r5 (%)")]
  for run in plan.runs:
    r5 = i2t_r5(run.workdir)
    rows.append((run.name, statuses.get(run.name, "not run"),
                 "-" if r5 is None else f"{100 * r5:.2f}"))
  widths = [max(len(row[k]) for row in rows) for k in range(2)]
  lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
  print(f"sweep {plan.root} ({plan.config}):\n" + "\n".join(lines), flush=True)
  if any(s == "interrupted" for s in statuses.values()):
    return 130
  return 1 if any(s.startswith("failed") for s in statuses.values()) else 0


# --- command line --------------------------------------------------------------------------------


def parse_flags(argv: list[str]) -> Optional[flags.FlagValues]:
  """mpma-sweep's flags, parsed into a fresh FlagValues (so tests can call main repeatedly, and
  nothing clashes with mpma-pretrain's flags in the same process); None after printing --help."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file with get_sweep, e.g. "
                                  "configs/pretrain.py:tiny", flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Sweep root: one run directory per run, and sweep.json",
                      flag_values=fv)
  flags.DEFINE_enum("mode", "local", ["local", "print"], "local: run the runs here one after "
                    "another; print: print one command per run", flag_values=fv)
  flags.DEFINE_string("launcher", "", "Command taking CONFIG WORKDIR [flags...] to launch each run "
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
  overrides = [a for a in argv[1:] if re.match(r"-{1,2}(no)?config\.", a)]
  base = [a for a in argv if a not in overrides]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=base)
  fv(base, known_only=True)
  for arg in overrides:
    field = arg.split("=", 1)[0].split(".", 1)[1]
    _field_parent(holder.value, field, arg.split("=", 1)[0])


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
    try:
      return main(argv)
    except flags.Error as e:
      print(f"mpma-sweep: {e}; see mpma-sweep --help", file=sys.stderr)
      return 2
    except ValueError as e:  # a bad sweep or override: the message names it
      print(f"mpma-sweep: {e}", file=sys.stderr)
      return 2

  app.run(_main, flags_parser=_absl_defaults_only)


if __name__ == "__main__":
  run()
