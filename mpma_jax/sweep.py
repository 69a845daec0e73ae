"""Sweeps: a config file's `get_sweep(arg)` (arg: the text after ':' in --config, as for get_config)
returns a list of override dicts {dotted.field: value}, built with the combinators below:

  def get_sweep(variant="tiny"):
    from mpma_jax.sweep import chain, fixed, product, sweep
    return chain(product(sweep("optim.lr", [2.5e-4, 5e-4]), sweep("model.memory.topk", [8, 16])),
                 fixed("model.memory.enabled", False))

`make_plan` checks every override against the config (an unknown field or a value of the wrong
type names the field and the run) and gives every run a directory ROOT/<name>, named by the fields
that vary across the sweep (`lr=0.00025,topk=8`); `run_local` runs the plan. The command line is
mpma_jax/cli/sweep.py (mpma-sweep).
"""
import copy
import dataclasses
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

from absl import flags
import ml_collections
from ml_collections import config_flags

from mpma_jax import checkpoint, overrides

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
  varying = [
      f for f in fields if len(runs) == 1 or len({repr(run.get(f, missing)) for run in runs}) > 1
  ]
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
    return {
        "config": self.config, "root": self.root, "fixed": self.fixed, "runs": [{
            "name": r.name, "workdir": r.workdir, "overrides": r.overrides, "action": r.action,
            "command": r.command
        } for r in self.runs]
    }


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
      run[field] = overrides.apply(trial, field, value, where)
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
  with open(log_path,
            "a") as log, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, env=env) as proc:
    for line in proc.stdout:
      sys.stdout.write(line)
      log.write(line)
      log.flush()
  return proc.returncode


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
        step = checkpoint.latest_step(os.path.join(run.workdir, "checkpoints"))
        statuses[run.name] = (f"stopped at step {step}"
                              if step is not None else "ended without eval.json")
      else:
        statuses[run.name] = f"ok{resumed}"
  except KeyboardInterrupt:
    pass  # the summary still shows what ran
  rows = [("run", "status", "i2t_r5 (%)")]
  for run in plan.runs:
    r5 = i2t_r5(run.workdir)
    rows.append((run.name, statuses.get(run.name,
                                        "not run"), "-" if r5 is None else f"{100 * r5:.2f}"))
  widths = [max(len(row[k]) for row in rows) for k in range(2)]
  lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
  print(f"sweep {plan.root} ({plan.config}):\n" + "\n".join(lines), flush=True)
  if any(s == "interrupted" for s in statuses.values()):
    return 130
  return 1 if any(s.startswith("failed") for s in statuses.values()) else 0
