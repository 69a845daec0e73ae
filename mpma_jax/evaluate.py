"""mpma-eval --run: a fine-tuning run's selected checkpoint evaluated again on its task."""
import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mpma_jax import checkpoint, finetune, sharding, tasks
from mpma_jax.data import downstream


def evaluate_finetuned(run_dir: str, protocol: str, split: str = "test") -> dict:
  """The metrics of a fine-tuning run's selected checkpoint on `split` (test: the plan's test
  records; select: its validation records), recomputed from the checkpoint."""
  with open(os.path.join(run_dir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(run_dir, "init.json")) as f:
    init = json.load(f)
  pdir = os.path.join(run_dir, protocol)
  if not os.path.isdir(os.path.join(pdir, "checkpoints")):
    raise FileNotFoundError(
        f"{pdir}/checkpoints not found: protocols run in {run_dir}: "
        f"{[p for p in config.protocols if os.path.isdir(os.path.join(run_dir, p))]}")
  with open(os.path.join(pdir, "plan.json")) as f:
    plan = json.load(f)
  vocab = []
  if os.path.exists(os.path.join(pdir, "vocab.json")):
    with open(os.path.join(pdir, "vocab.json")) as f:
      vocab = json.load(f)
  model_cfg = ml_collections.ConfigDict(init["model"])
  role = {"test": "test", "select": "select"}[split]
  task = tasks.get(config.task)
  dataset = config.dataset if role == "test" or not task.other_train_dataset else \
      config.data.train_dataset
  builder = downstream.open_builder(dataset, config.data_dir)
  class_names = list(builder.info.metadata.get("class_names", ()))
  num_outputs = task.num_outputs(config, vocab, class_names)
  tokenizer_dir = os.path.join(checkpoint.resolve_init(init["init"])[0], "tokenizer")
  decode = downstream.decoder(config, builder, tokenizer_dir, model_cfg.image.size, vocab)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  model = finetune.build_model(config, model_cfg, num_outputs)
  batch = finetune.dummy_batch(config, model_cfg, num_outputs)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    init = lambda: model.init(jax.random.key(0), batch, method=model.init_all)["params"]
    shardings = sharding.logical_shardings(jax.eval_shape(init), mesh, rules)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          jax.eval_shape(lambda: nn.meta.unbox(init())), shardings)
    params, step = checkpoint.restore_selected(os.path.join(pdir, "checkpoints"), target)
    rows = finetune.predict_split(
        config, finetune.make_predict(model, mesh), params,
        downstream.eval_batches(config, builder, plan[role]["split"],
                                np.asarray(plan[role]["indices"]), decode), mesh)
  result = task.score(rows, config.data.labels or class_names)
  return {
      "run": os.path.abspath(run_dir), "protocol": protocol, "split": split, "checkpoint": step,
      **result
  }
