"""Evaluation: zero-shot image <-> text retrieval from the GLA global embeddings (the end of every
pre-training run), and `mpma-eval` (a fine-tuned checkpoint on its task; `--suite`: every task with
data, as one Markdown table)."""
import json
import os
import runpy

import jax
import numpy as np

from mpma_jax import losses
from mpma_jax.models.mpma import MPMA

KS = (1, 5, 10)


def _global_embeddings(module: MPMA, image, text_ids, text_mask):
  image_gla, text_gla = module.align(module.embed_image(image), module.embed_text(text_ids, text_mask))
  return image_gla[:, 0], text_gla[:, 0]  # [B, G] each, L2-normalised


def make_embed_fn(model: MPMA, mesh=None):
  """jit-compiled (params, image, text_ids, text_mask) -> (image_emb [B, G], text_emb [B, G]).

  With a mesh the embeddings come back replicated, so that every host can read them (the
  parameters may be sharded over several hosts; the inputs are the same NumPy arrays on each).
  """
  out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda params, image, ids, mask: model.apply(
      {"params": params}, image, ids, mask, method=_global_embeddings), out_shardings=out)


def retrieval(embed_fn, params, pairs: dict, batch_size: int) -> dict:
  """R@1/5/10 in both directions for N pairs ranked all against all, plus chance = k / N."""
  n = len(pairs["image"])
  image_emb, text_emb = [], []
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in pairs.items()}
    i, t = embed_fn(params, chunk["image"], chunk["text_ids"], chunk["text_mask"])
    image_emb.append(np.asarray(i))
    text_emb.append(np.asarray(t))
  sim = np.concatenate(image_emb) @ np.concatenate(text_emb).T  # [N, N], image rows
  return losses.retrieval_recall(sim, KS)


def chance(num_pairs: int) -> dict:
  """Expected recall of a random ranking."""
  return {f"{d}_r{k}": min(k / num_pairs, 1.0) for d in ("i2t", "t2i") for k in KS}


def format_table(rows: dict) -> str:
  """rows: name -> recall dict (fractions) -> a fixed-width table in percent."""
  cols = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS]
  lines = [f"{'':<10}" + "".join(f"{c:>9}" for c in cols)]
  for name, r in rows.items():
    lines.append(f"{name:<10}" + "".join(f"{100 * r[c]:>9.2f}" for c in cols))
  return "\n".join(lines)


# --- mpma-eval: a checkpoint on a downstream task, and the suite table ----------------------------
# (task config, variant) of the suite, in the order of the table; each runs when its dataset is built.
SUITE = (("vqa_rad", ""), ("slake", ""), ("vqa_med_2019", ""), ("melinda", ""),
         ("roco", "zero_shot"), ("roco", "finetune"),
         *(("chexpert", f"{m}_{p}") for m in ("probe", "finetune") for p in (1, 10, 100)),
         *(("rsna_pneumonia", f"{m}_{p}") for m in ("probe", "finetune") for p in (1, 10, 100)))
# Columns of the suite table: the headline metric(s) of each task.
TABLE_COLUMNS = ("task", "protocol", "open", "closed", "overall", "majority closed", "accuracy",
                 "mean AUC", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "note")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "finetune")


def load_task_config(name: str, variant: str = "", config_dir: str = CONFIG_DIR):
  """configs/finetune/<name>.py[:variant] as a ConfigDict."""
  path = os.path.join(config_dir, f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no task config {path}")
  module = runpy.run_path(path)
  return module["get_config"](*([variant] if variant else []))


def evaluate_finetuned(run_dir: str, protocol: str, split: str = "test") -> dict:
  """The metrics of a fine-tuning run's selected checkpoint on `split` (test: the plan's test
  records; select: its validation records), recomputed from the checkpoint."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mpma_jax import finetune, sharding  # pylint: disable=g-import-not-at-top
  from mpma_jax.data import downstream  # pylint: disable=g-import-not-at-top
  with open(os.path.join(run_dir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(run_dir, "init.json")) as f:
    init = json.load(f)
  pdir = os.path.join(run_dir, protocol)
  if not os.path.isdir(os.path.join(pdir, "checkpoints")):
    raise FileNotFoundError(f"{pdir}/checkpoints not found: protocols run in {run_dir}: "
                            f"{[p for p in config.protocols if os.path.isdir(os.path.join(run_dir, p))]}")
  with open(os.path.join(pdir, "plan.json")) as f:
    plan = json.load(f)
  vocab = []
  if os.path.exists(os.path.join(pdir, "vocab.json")):
    with open(os.path.join(pdir, "vocab.json")) as f:
      vocab = json.load(f)
  model_cfg = ml_collections.ConfigDict(init["model"])
  role = {"test": "test", "select": "select"}[split]
  dataset = config.dataset if role == "test" or config.task != "retrieval" else \
      config.data.train_dataset
  builder = downstream.open_builder(dataset, config.data_dir)
  class_names = list(builder.info.metadata.get("class_names", ()))
  num_outputs = {"vqa": len(vocab), "classification": len(class_names),
                 "image_classification": len(config.data.labels), "retrieval": 0}[config.task]
  tokenizer_dir = os.path.join(finetune.resolve_init(init["init"])[0], "tokenizer")
  decode = downstream.decoder(config, builder, tokenizer_dir, model_cfg.image.size, vocab)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  model = finetune.build_model(config, model_cfg, num_outputs)
  batch = finetune.dummy_batch(config, model_cfg, num_outputs)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    init = lambda: model.init(jax.random.key(0), batch, method=model.init_all)["params"]
    shardings = sharding.logical_shardings(jax.eval_shape(init), mesh, rules)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          jax.eval_shape(lambda: nn.meta.unbox(init())), shardings)
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(pdir), "checkpoints"))
    step = manager.latest_step()  # the run keeps only its selected checkpoint
    params = manager.restore(step, args=ocp.args.StandardRestore(target))
    manager.close()
    rows = finetune.predict_split(config, finetune.make_predict(model, mesh), params,
                                  downstream.eval_batches(config, builder, plan[role]["split"],
                                                          np.asarray(plan[role]["indices"]),
                                                          decode), mesh)
  result = finetune.score(config.task, rows, config.data.labels or class_names)
  return {"run": os.path.abspath(run_dir), "protocol": protocol, "split": split,
          "checkpoint": step, **result}


def table_rows(name: str, results: dict) -> list[dict]:
  """Suite table rows of one task's {protocol: result} (finetune.finetune's return value)."""
  rows = []
  for protocol, r in results.items():
    t = r["test"]
    row = {"task": name, "protocol": protocol, **{k: v for k, v in t.items()
                                                   if k in TABLE_COLUMNS}}
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
    config.update_from_flattened_dict({key: value})


def parse_override(text: str) -> tuple[str, object]:
  """'key=value' -> (key, value): the value as a Python literal (1, 0.5, ('a', 'b'), True) when it
  is one, else the string."""
  import ast  # pylint: disable=g-import-not-at-top
  key, sep, value = text.partition("=")
  if not sep or not key.strip():
    raise ValueError(f"--override {text!r}: expected key=value, e.g. train.epochs=1")
  try:
    return key.strip(), ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    return key.strip(), value.strip()


def suite(init: str, data_dir: str, workdir: str, tasks=SUITE, overrides=None,
          log_print=print) -> tuple[str, list]:
  """Fine-tunes and tests every task of `tasks` whose dataset is built in data_dir; returns the
  Markdown table and the rows (also <workdir>/suite.md and suite.json). Tasks without data are
  listed under the table. overrides: config keys set on every task (`apply_overrides`)."""
  from mpma_jax import finetune, metrics  # pylint: disable=g-import-not-at-top
  from mpma_jax.data import builders  # pylint: disable=g-import-not-at-top
  rows, missing = [], []
  for name, variant in tasks:
    config = load_task_config(name, variant) if isinstance(name, str) else name
    label = f"{config.dataset}" + (f":{variant}" if variant else "")
    config.data_dir = data_dir
    apply_overrides(config, label, overrides)
    needed = [config.dataset] + ([config.data.train_dataset]
                                 if config.task == "retrieval" and config.train.epochs else [])
    if not all(builders.builder(n, data_dir).is_prepared() for n in needed):
      missing.append(label)
      continue
    log_print(f"suite: {label}")
    results = finetune.finetune(config, init, os.path.join(workdir, label.replace(":", "_")),
                                log_print)
    rows += table_rows(label, results)
  table = metrics.markdown_table(rows, [c for c in TABLE_COLUMNS
                                        if any(c in r for r in rows)]) if rows else "(no task ran)"
  if missing:
    table += "\n\nNot run (dataset not built in " + data_dir + "): " + ", ".join(missing)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "suite.md"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, "suite.json"), "w") as f:
      json.dump({"rows": rows, "not_built": missing}, f, indent=1)
  return table, rows


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if f.suite:
    if not (f.init and f.data_dir and f.workdir):
      raise app_usage("--suite needs --init (a pre-training run), --data_dir and --workdir")
    tasks = SUITE if not f.tasks else tuple(t for t in SUITE if t[0] in f.tasks.split(","))
    overrides = dict(parse_override(o) for o in f.override)
    table, _ = suite(f.init, f.data_dir, f.workdir, tasks, overrides)
    print(table)
    return
  if not f.run:
    raise app_usage("give --run FINETUNE_RUN (evaluate its checkpoint) or --suite")
  with open(os.path.join(f.run, "config.json")) as fp:
    protocols = json.load(fp)["protocols"]
  out = {p: evaluate_finetuned(f.run, p, f.split) for p in ([f.protocol] if f.protocol else protocols)}
  path = f.out or os.path.join(f.run, f"eval_{f.split}.json")
  with open(path, "w") as fp:
    json.dump(out, fp, indent=1)
  print(json.dumps({p: {k: v for k, v in r.items() if isinstance(v, float)} for p, r in out.items()}))


def app_usage(message: str):
  from absl import app  # pylint: disable=g-import-not-at-top
  return app.UsageError(message)


def run():
  """`mpma-eval --run FINETUNE_RUN [--protocol P] [--split test|select] [--out F]` writes the
  metrics of a fine-tuning run's selected checkpoint as JSON; `mpma-eval --suite --init RUN
  --data_dir D --workdir OUT [--tasks vqa_rad,slake] [--override key=value ...]` fine-tunes and
  tests every task with data and prints the Markdown table (also OUT/suite.md)."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("run", None, "A fine-tuning run directory (mpma-finetune --workdir)")
  flags.DEFINE_string("protocol", None, "prior | clean (default: every protocol of the run)")
  flags.DEFINE_enum("split", "test", ["test", "select"], "Records to evaluate")
  flags.DEFINE_string("out", None, "Output JSON (default: RUN/eval_<split>.json)")
  flags.DEFINE_bool("suite", False, "Run every task whose dataset is built and print the table")
  flags.DEFINE_string("init", None, "--suite: the pre-training run (or RUN/checkpoints/<step>)")
  flags.DEFINE_string("data_dir", None, "--suite: where `mpma-data build` wrote the datasets")
  flags.DEFINE_string("workdir", None, "--suite: output directory (one fine-tuning run per task)")
  flags.DEFINE_string("tasks", None, "--suite: comma-separated task configs to run (default all)")
  flags.DEFINE_multi_string("override", [], "--suite: key=value set on every task's config "
                            "(repeatable), e.g. --override train.epochs=1 --override image_size=0")
  app.run(main)


if __name__ == "__main__":
  run()
