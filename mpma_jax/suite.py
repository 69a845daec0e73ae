"""The downstream suite (mpma-eval --suite): every task of the table whose dataset is built,
fine-tuned from one pre-training run and tested, as one Markdown table."""
import json
import os
import runpy

import jax

from mpma_jax import finetune, metrics
from mpma_jax import overrides as overrides_lib
from mpma_jax import tasks as task_table
from mpma_jax.data import builders

# (task config, variant) of the suite, in the order of the table; each runs when its dataset is built.
SUITE = (("vqa_rad", ""), ("slake", ""), ("vqa_med_2019", ""), ("melinda", ""),
         ("roco", "zero_shot"), ("roco", "finetune"),
         *(("chexpert", f"{m}_{p}") for m in ("probe", "finetune") for p in (1, 10, 100)),
         *(("rsna_pneumonia", f"{m}_{p}") for m in ("probe", "finetune") for p in (1, 10, 100)))
# Columns of the suite table: the headline metric(s) of each task.
TABLE_COLUMNS = ("task", "protocol", "open", "closed", "overall", "majority closed", "accuracy",
                 "mean AUC", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "note")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "finetune")


def load_task_config(name: str, variant: str = "", config_dir: str = CONFIG_DIR):
  """mpma_jax/configs/finetune/<name>.py[:variant] as a ConfigDict."""
  path = os.path.join(config_dir, f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no task config {path}")
  module = runpy.run_path(path)
  return module["get_config"](*([variant] if variant else []))


def table_rows(name: str, results: dict) -> list[dict]:
  """Suite table rows of one task's {protocol: result} (finetune.finetune's return value)."""
  rows = []
  for protocol, r in results.items():
    t = r["test"]
    row = {"task": name, "protocol": protocol, **{k: v for k, v in t.items() if k in TABLE_COLUMNS}}
    if "mean" in t:
      row["mean AUC"] = t["mean"]
    if "majority_baseline" in r:
      row["majority closed"] = r["majority_baseline"]["closed"]
    if r.get("selected_on_test"):
      row["note"] = "selected on test"
    rows.append(row)
  return rows


def apply_overrides(config, label: str, overrides=None) -> None:
  """Sets the flattened config keys of `overrides` ({"train.epochs": 1, ...}) on a task config;
  a value that is a dict, keyed by a task label of the table ("rsna_pneumonia:finetune_100"),
  applies to that task only, after the shared ones. A zero-shot task (train.epochs == 0) stays
  zero-shot: a shared train.epochs is not applied to it."""
  shared = {k: v for k, v in (overrides or {}).items() if not isinstance(v, dict)}
  if config.train.epochs == 0:
    shared.pop("train.epochs", None)
  for key, value in {**shared, **(overrides or {}).get(label, {})}.items():
    overrides_lib.apply(config, key, value, f"override for {label}")


def run(init: str, data_dir: str, workdir: str, tasks=SUITE, overrides=None,
        log_print=print) -> tuple[str, list]:
  """Fine-tunes and tests every task of `tasks` whose dataset is built in data_dir; returns the
  Markdown table and the rows (also <workdir>/suite.md and suite.json). Tasks without data are
  listed under the table. overrides: config keys set on every task (`apply_overrides`)."""
  rows, missing = [], []
  for name, variant in tasks:
    config = load_task_config(name, variant) if isinstance(name, str) else name
    label = f"{config.dataset}" + (f":{variant}" if variant else "")
    config.data_dir = data_dir
    apply_overrides(config, label, overrides)
    needed = [config.dataset] + ([config.data.train_dataset] if task_table.get(
        config.task).other_train_dataset and config.train.epochs else [])
    if not all(builders.builder(n, data_dir).is_prepared() for n in needed):
      missing.append(label)
      continue
    log_print(f"suite: {label}")
    results = finetune.finetune(config, init, os.path.join(workdir, label.replace(":", "_")),
                                log_print)
    rows += table_rows(label, results)
  table = metrics.markdown_table(
      rows, [c for c in TABLE_COLUMNS if any(c in r for r in rows)]) if rows else "(no task ran)"
  if missing:
    table += "\n\nNot run (dataset not built in " + data_dir + "): " + ", ".join(missing)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "suite.md"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, "suite.json"), "w") as f:
      json.dump({"rows": rows, "not_built": missing}, f, indent=1)
  return table, rows
