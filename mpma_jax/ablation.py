"""The ablation study (configs/ablations.py, docs/ablations.md): pre-trains every arm with every
seed, runs the downstream suite on every run, and summarises each arm and metric by the mean and
spread over seeds, marking the differences from full MPMA that are larger than that spread.

Layout under ROOT:
  <arm>/seed=<s>/               an mpma-pretrain run: finished when it holds eval.json (never
                                trained again), resumed when it holds checkpoints only
  <arm>/seed=<s>/suite/<task>/  the suite on that run for one task (suite.md, suite.json); a task
                                whose suite.json holds results is not run again
  ablations.json                every run's figures and the summary
"""
import copy
import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Optional

import ml_collections
import numpy as np

from mpma_jax import logger, metrics, suite, sweep, train
from mpma_jax import overrides as overrides_lib
from mpma_jax.configs import ablations as study
from mpma_jax.data import builders

# Zero-shot retrieval of each pre-training run (eval.json, trained model), read from the GLA global
# embeddings: an arm without the global loss is expected near chance.
PRETRAIN_METRICS = ("i2t_r5", "t2i_r5")
# Suite table columns that are not figures of the model.
_NOT_METRICS = ("task", "protocol", "note", "majority closed")
# The part of the Markdown file that `write_markdown` replaces.
BEGIN = "<!-- ablation results: written by benchmarks/ablations.py -->"
END = "<!-- end of ablation results -->"


@dataclasses.dataclass
class Run:
  arm: str
  seed: int
  workdir: str
  config: ml_collections.ConfigDict
  action: str = ""  # what the study found: start | resume | skip (finished before)
  status: str = ""  # ok | failed: <error> | stopped at step N, then any task that failed
  fine_tuned: int = 0  # tasks fine-tuned by this invocation (not reused from an earlier one)
  metrics: dict = dataclasses.field(default_factory=dict)  # figure name -> value in [0, 1]


def plan(root: str, variant: str, arm_names=None, seeds=study.SEEDS, fixed=None) -> list[Run]:
  """The runs of the study: every arm of `arm_names` (default: all of configs/ablations.py) with
  every seed, each config checked. fixed: {dotted field: value} set on every run (not a field an
  arm sets)."""
  arms = study.arms(variant)
  arm_names = list(arm_names or arms)
  for name in arm_names:
    if name not in arms:
      raise ValueError(f"unknown arm {name!r}; configs/ablations.py has {', '.join(arms)}")
  fixed = dict(fixed or {})
  if "seed" in fixed:
    raise ValueError("seed is set by the study's seeds (--seeds), not fixed for every run")
  runs = []
  for name in arm_names:
    for field in arms[name].keys() & fixed.keys():
      raise ValueError(f"{field} is set by arm {name!r} and also fixed for every run; drop one")
    for seed in seeds:
      config = study.get_config(variant)
      where = f"arm {name!r}, seed {seed}"
      for field, value in {**fixed, **arms[name], "seed": seed}.items():
        overrides_lib.apply(config, field, value, where)
      runs.append(Run(name, seed, os.path.join(root, name, f"seed={seed}"), config))
  return runs


class Preempted(Exception):
  """SIGTERM stopped a pre-training run (with a checkpoint): the study stops there too, rather than
  go on to the next run, and the same command continues it."""


def pretrain(run: Run, log: Callable[[str], None] = print) -> None:
  """Pre-trains the run unless it is finished; sets run.action and run.status. Raises Preempted
  when SIGTERM stopped it."""
  run.action = sweep.run_state(run.workdir)
  if run.action == "skip":
    run.status = "ok"
    return
  log(f"=== pre-training {run.workdir} ({run.action})")
  try:
    result = train.pretrain(copy.deepcopy(run.config), run.workdir, resume=run.action == "resume")
  except Exception as e:  # pylint: disable=broad-except  (the other runs go on)
    run.status = f"failed: {type(e).__name__}: {e}".splitlines()[0]
    log(f"{run.workdir}: {run.status}")
    return
  if result.get("reason", "").startswith("preempted"):
    raise Preempted(f"{run.workdir}: {result['reason']}, checkpoint {result['stopped_at']} saved; "
                    "run the same command again to continue the study")
  run.status = f"stopped at step {result['stopped_at']}" if "stopped_at" in result else "ok"


def downstream_tasks(task_names, data_dir: str, image_size: int,
                     synthetic=None) -> dict[str, ml_collections.ConfigDict]:
  """Task name -> its fine-tuning config (configs/ablations.py TASKS), generating the synthetic
  sets it reads in data_dir (or reusing them) at image_size with `synthetic` images per split."""
  sizes = {**study.SYNTHETIC, **(synthetic or {})}
  out = {}
  for name in task_names:
    if name not in study.TASKS:
      raise ValueError(f"unknown task {name!r}; configs/ablations.py has "
                       f"{', '.join(study.TASKS)}")
    config_name, variant, dataset, task_overrides = study.TASKS[name]
    if builders.get(dataset).GENERATED:
      dataset = f"{dataset}/n{sizes['num_train']}_e{sizes['num_eval']}_s{image_size}_seed0"
      builders.build(dataset, "", data_dir)
    config = suite.load_task_config(config_name, variant)
    config.dataset = dataset
    for field, value in task_overrides.items():
      overrides_lib.apply(config, field, value, f"task {name}")
    out[name] = config
  return out


def run_suite(run: Run, tasks: dict, data_dir: str, finetune_overrides: dict,
              log: Callable[[str], None] = print) -> dict[str, list]:
  """Task name -> the suite's rows on this run ([] when its dataset is not built or its
  fine-tuning failed, which run.status then names), each task fine-tuned with the run's seed
  unless an earlier call left its results (what an interrupted or failed attempt left is removed
  first: a task starts over)."""
  out = {}
  for name, config in tasks.items():
    workdir = os.path.join(run.workdir, "suite", name)
    saved = os.path.join(workdir, "suite.json")
    if os.path.exists(saved):
      with open(saved) as f:
        rows = json.load(f)["rows"]
      if rows:
        out[name] = rows
        continue
    if os.path.isdir(workdir):  # an interrupted or failed attempt: the task starts over
      shutil.rmtree(workdir)
    overrides = {**finetune_overrides, "seed": run.seed}
    run.fine_tuned += 1
    try:
      _, out[name] = suite.run(run.workdir, data_dir, workdir, [(copy.deepcopy(config), "")],
                               overrides, log)
    except Exception as e:  # pylint: disable=broad-except  (the other tasks and runs go on)
      out[name] = []
      run.status += f"; {name} failed: {type(e).__name__}: {e}".splitlines()[0]
      log(f"{workdir}: {name} failed: {e}")
  return out


def run_metrics(workdir: str, task_rows: dict[str, list]) -> dict[str, float]:
  """Figure name -> value of one finished run: `pretrain <metric>` from eval.json and
  `<task> <column>` from the suite rows (`<task> <protocol> <column>` for a protocol other than
  clean)."""
  with open(os.path.join(workdir, "eval.json")) as f:
    trained = json.load(f)["trained"]
  out = {f"pretrain {k}": float(trained[k]) for k in PRETRAIN_METRICS}
  for task, rows in task_rows.items():
    for row in rows:
      prefix = task if row["protocol"] == "clean" else f"{task} {row['protocol']}"
      for column in suite.TABLE_COLUMNS:
        value = row.get(column)
        if column not in _NOT_METRICS and isinstance(value, (int, float)):
          out[f"{prefix} {column}"] = float(value)
  return out


def summarize(per_arm: dict[str, list[dict]], reference: str = study.REFERENCE) -> dict:
  """per_arm: arm -> one figures dict per finished run. Returns arm -> figure -> {values, mean,
  spread, delta, exceeds}: spread is half the range over seeds (mean ± spread spans the seeds'
  values); delta = mean - the reference's mean; exceeds: |delta| > spread + the reference's spread
  (the two arms' seed ranges do not overlap), None with fewer than two seeds on either side."""
  out = {}
  for arm, runs in per_arm.items():
    out[arm] = {}
    names = list(dict.fromkeys(k for r in runs for k in r))
    for name in names:
      values = [r[name] for r in runs if name in r]
      spread = (max(values) - min(values)) / 2
      out[arm][name] = {"values": values, "mean": float(np.mean(values)), "spread": spread}
      out[arm][name].update(delta=None, exceeds=None)
  for arm, figures in out.items():
    if arm == reference:
      continue
    for name, f in figures.items():
      ref = out.get(reference, {}).get(name)
      if ref is None:
        continue
      f["delta"] = f["mean"] - ref["mean"]
      if len(f["values"]) > 1 and len(ref["values"]) > 1:
        f["exceeds"] = bool(abs(f["delta"]) > f["spread"] + ref["spread"])
  return out


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def markdown(summary: dict, runs: list[Run], settings: str,
             reference: str = study.REFERENCE) -> str:
  """The results section: the summary table (rows: arms; columns: figures), the differences from
  the reference larger than the spread, and every run's figures."""
  figures = list(dict.fromkeys(name for arm in summary.values() for name in arm))
  rows = []
  for arm, fs in summary.items():
    row = {"arm": arm, "seeds": max((len(f["values"]) for f in fs.values()), default=0)}
    for name, f in fs.items():
      cell = f"{_pct(f['mean'])} ± {_pct(f['spread'])}"
      if f["delta"] is not None:
        sign = "+" if f["delta"] >= 0 else "−"
        cell += f" ({sign}{_pct(abs(f['delta']))})"
      row[name] = f"**{cell}**" if f["exceeds"] else cell
    rows.append(row)
  big = [
      f"* {arm}, {name}: {'+' if f['delta'] >= 0 else '−'}{_pct(abs(f['delta']))} "
      f"({_pct(f['mean'])} ± {_pct(f['spread'])} against {_pct(summary[reference][name]['mean'])} "
      f"± {_pct(summary[reference][name]['spread'])})" for arm, fs in summary.items()
      for name, f in fs.items() if f["exceeds"]
  ]
  per_run = [{"arm": r.arm, "seed": r.seed, "status": r.status, **r.metrics} for r in runs]
  return "\n".join([
      settings,
      "",
      "Figures in %: mean ± half the range over seeds; in parentheses the difference from "
      f"`{reference}`, in bold where it is larger than the two spreads together (the seeds' "
      "ranges do not overlap).",
      "",
      metrics.markdown_table(rows, ["arm", "seeds", *figures]),
      "",
      f"Differences from `{reference}` larger than the spread between seeds:",
      "",
      "\n".join(big) if big else "* none",
      "",
      "Every run:",
      "",
      metrics.markdown_table(per_run, ["arm", "seed", "status", *figures], percent=figures),
  ])


def write_markdown(path: str, section: str) -> None:
  """Puts section between BEGIN and END in the file at path (appended, or the file created, when
  the markers are not there)."""
  text = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  block = f"{BEGIN}\n{section}\n{END}"
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + block + rest.split(END, 1)[1]
  else:
    text = (text.rstrip("\n") + "\n\n" if text else "") + block + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def run(root: str, variant: str = "tiny", data_dir: str = "", arm_names=None, seeds=study.SEEDS,
        task_names=None, fixed=None, finetune_overrides=None, synthetic=None,
        out: Optional[str] = None, log: Callable[[str], None] = print, command: str = "") -> dict:
  """The whole study: pre-training (finished runs skipped), the suite on every finished run
  (finished tasks skipped), ROOT/ablations.json, and the results section of `out` (Markdown) when
  given. data_dir (default ROOT/data) holds the synthetic pre-training set and the downstream
  datasets. fixed: pre-training overrides of every run; finetune_overrides: on top of
  configs/ablations.py FINETUNE; command: how the study was invoked, for the record. Returns the
  contents of ablations.json."""
  start = time.time()
  data_dir = data_dir or os.path.join(root, "data")
  fixed = {"data.data_dir": data_dir, **(fixed or {})}
  runs = plan(root, variant, arm_names, seeds, fixed)
  finetune_overrides = {**study.FINETUNE, **(finetune_overrides or {})}
  tasks = downstream_tasks(task_names or list(study.TASKS), data_dir,
                           runs[0].config.model.image.size, synthetic)
  for name, config in tasks.items():  # a bad override fails now, not after the pre-training
    suite.apply_overrides(copy.deepcopy(config), name, {**finetune_overrides, "seed": 0})
  for r in runs:
    pretrain(r, log)

  per_arm = {}
  for r in runs:
    if os.path.exists(os.path.join(r.workdir, "eval.json")):
      r.metrics = run_metrics(r.workdir, run_suite(r, tasks, data_dir, finetune_overrides, log))
      per_arm.setdefault(r.arm, []).append(r.metrics)
  summary = summarize(per_arm)
  invocation = {
      "command": command, "machine": logger.machine(), "wall_s": round(time.time() - start, 1),
      "pretrained": sum(r.action in ("start", "resume") for r in runs), "runs": len(runs),
      "fine_tuned": sum(r.fine_tuned for r in runs), "tasks": len(runs) * len(tasks)
  }
  result = {
      "invocation": invocation, "variant": variant, "fixed": fixed, "finetune": finetune_overrides,
      "tasks": list(tasks), "runs": [{
          "arm": r.arm, "seed": r.seed, "workdir": r.workdir, "action": r.action,
          "status": r.status, "metrics": r.metrics
      } for r in runs], "summary": summary
  }
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "ablations.json"), "w") as f:
    json.dump(result, f, indent=1)
  shown = lambda d: ", ".join(f"`{k}={v}`" for k, v in d.items() if k != "data.data_dir") or "none"
  settings = (
      f"Variant `{variant}`, seeds {', '.join(map(str, seeds))}, tasks "
      f"{', '.join(tasks)}. Pre-training overrides: {shown(fixed)}. Fine-tuning "
      f"overrides: {shown(finetune_overrides)}.\n\n"
      f"{'Command: `' + command + '`. ' if command else ''}Machine: "
      f"{invocation['machine']}. This invocation: {invocation['wall_s'] / 60:.0f} min wall, "
      f"pre-trained {invocation['pretrained']} of {invocation['runs']} runs and "
      f"fine-tuned {invocation['fine_tuned']} of {invocation['tasks']} tasks (the others "
      "were finished by an earlier invocation and are reused).")
  section = markdown(summary, runs, settings)
  if out:
    write_markdown(out, section)
  log(section)
  return result
