"""benchmarks/torch_reference.py equals the JAX train step (losses, one AdamW step), and
benchmarks/train_step.py runs end to end with JAX and PyTorch rows."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import torch_reference, train_step
from mpma_jax import optim
from mpma_jax.interop import torch_mpma
from mpma_jax.interop.common import flatten
from mpma_jax.models import gla
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # the slow tier: compiles the benchmark's JAX and PyTorch steps

BATCH = 8
LOSS_RTOL = 1e-4
PARAM_ATOL = 1e-5
LR = 1e-3


def step_config():
  """tiny_config on one device, with optimizer settings under which one step is checkable.

  * warmup 0: optax's schedule gives lr 0 at step 0 during warm-up, so nothing would move.
  * lr 1e-3 (x2.5 for the non-encoder group): every parameter moves by ~1e-3, 100x the tolerance.
  * eps 1e-3: with the default 1e-8 the first AdamW update is lr * g / (|g| + eps) ~ lr * sign(g),
    so a gradient that is ~0 in both frameworks but of opposite float32 noise flips a +-lr update.
    The update's slope in g is at most lr / eps = 1, so a 1e-7 gradient difference stays 1e-7.
  * weight decay 1.0: lr * wd * |p| is ~2e-5 on weights and 1e-3 on LayerNorm scales, so decaying
    a parameter that must not be decayed (or the reverse) exceeds the tolerance.
  """
  config = train_step.bench_config(tiny_config(), BATCH, "float32", "clean")
  config.optim.update(warmup=0.0, lr=LR, eps=1e-3, weight_decay=1.0)
  return config


@pytest.fixture(scope="module")
def one_step():
  """One JAX step and one PyTorch step from the same parameters on the same batch."""
  config = step_config()
  batch = torch_reference.random_batch(config, BATCH, seed=3)
  jstep = train_step.JaxStep(config, batch, jax.devices()[0])
  initial = jax.tree.map(np.asarray, jstep.initial_params)
  jstep()
  jax_metrics = {k: float(v) for k, v in jstep.metrics.items()}
  jax_params = flatten(jax.tree.map(np.asarray, jax.device_get(jstep.state.params)))

  model = torch_mpma.MPMATorch.from_params(initial, config.model)
  step = torch_reference.make_torch_step(config, model)
  torch_metrics = {k: float(v) for k, v in step(torch_reference.to_torch(batch)).items()}
  torch_params = flatten(torch_mpma.params_from_state_dict(model.state_dict(), config.model))
  return config, flatten(initial), jax_metrics, jax_params, torch_metrics, torch_params


def test_losses_equal_jax(one_step):
  _, _, jax_metrics, _, torch_metrics, _ = one_step
  for k in ("mlm", "mim", "global", "local", "loss", "grad_norm"):
    assert torch_metrics[k] == pytest.approx(jax_metrics[k], rel=LOSS_RTOL), k
  assert torch_metrics["mlm_acc"] == pytest.approx(jax_metrics["mlm_acc"], abs=1e-6)
  # The batch's masks make every loss non-trivial.
  assert all(jax_metrics[k] > 0.1 for k in ("mlm", "mim", "global", "local"))


def test_one_step_updates_params_like_jax(one_step):
  config, initial, _, jax_params, _, torch_params = one_step
  assert sorted(torch_params) == sorted(jax_params)
  diffs = {k: float(np.max(np.abs(torch_params[k] - v))) for k, v in jax_params.items()}
  worst = max(diffs, key=diffs.get)
  assert diffs[worst] <= PARAM_ATOL, (worst, diffs[worst])
  # The step moved the parameters by far more than the tolerance (those it leaves alone get no
  # gradient: zero-initialised biases of keys, the image stream's last layer, poolers, ITM head).
  moved = {k: float(np.max(np.abs(v - initial[k]))) for k, v in jax_params.items()}
  assert np.median(list(moved.values())) > 30 * PARAM_ATOL
  assert sum(m > 10 * PARAM_ATOL for m in moved.values()) >= 0.75 * len(moved)
  # Group learning rates: a non-encoder bias moves lr_mult times farther than an encoder one
  # (the first AdamW step is lr * g / (|g| + eps) ~ lr where |g| >> eps).
  enc = moved["text_encoder/layer_0/mlp/fc2/bias"]
  new = moved["fusion/text_layer_0/mlp/fc2/bias"]
  assert new / enc == pytest.approx(config.optim.lr_mult, rel=0.1)


def test_schedule_and_groups_match_optim():
  config = tiny_config()
  config.train.steps = 40
  schedule = optim.schedule(config.optim, config.train.steps, 1.0)
  for s in (0, 1, 3, 4, 5, 20, 39, 40, 45):
    assert torch_reference.schedule_factor(config, s) == pytest.approx(float(schedule(s)), abs=1e-6)
  model = torch_mpma.MPMATorch(config.model)
  groups = torch_reference.param_groups(config, model)
  by_name = {n: g for g in groups for n in g["names"]}
  assert len(by_name) == len(list(model.parameters()))
  o = config.optim
  assert by_name["image_encoder.block_0.attn.query.weight"]["lr"] == o.lr
  assert by_name["fusion.text_layer_0.mlp.fc1.weight"]["lr"] == o.lr * o.lr_mult
  for name in ("mlm_head.ln.weight", "text_encoder.layer_0.attn.query.bias",
               "gla.log_temperature_local"):  # LayerNorm scale, bias, temperature: no decay
    assert by_name[name]["weight_decay"] == 0.0, name
  assert by_name["memory.memory"]["weight_decay"] == o.weight_decay


@pytest.mark.parametrize("chunk", [2, 8])
def test_local_similarities_match_jax(chunk):
  rng = np.random.default_rng(chunk)
  normal = lambda *s: rng.normal(size=s).astype(np.float32)
  image = np.asarray(gla.l2_normalize(jnp.asarray(normal(6, 5, 16))))  # [Bi, P, G]
  text = np.asarray(gla.l2_normalize(jnp.asarray(normal(6, 7, 16))))  # [Bt, L, G]
  word_mask = (rng.random((6, 7)) < 0.6).astype(np.int32)
  word_mask[2] = 0  # a text without words scores 0
  t = lambda x: torch.from_numpy(np.array(x))
  want = gla.filip_similarity(image, text, word_mask, chunk)
  got = torch_reference.filip_similarity(t(image), t(text), t(word_mask), chunk)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g.numpy(), np.asarray(w), atol=1e-6)
  want = gla.attention_similarity(image, text, word_mask, 4.0, 5.0, chunk)
  got = torch_reference.attention_similarity(t(image), t(text), t(word_mask), 4.0, 5.0, chunk)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g.numpy(), np.asarray(w), atol=1e-5)


def test_benchmark_runs_end_to_end():
  lines = []
  args = train_step.parse_args([
      "--batch",
      str(BATCH), "--steps", "2", "--warmup", "0", "--rounds", "1", "--torch", "eager",
      "--peak_size", "128"
  ])
  summary = train_step.benchmark(step_config(), args, log=lines.append)
  text = "\n".join(lines)
  assert "| jax | clean |" in text and "| torch eager | clean |" in text
  assert json.loads(lines[-1]) == json.loads(json.dumps(summary))  # the last line is the JSON
  rows = {r["variant"]: r for r in summary["rows"]}
  assert rows["jax"]["steps"] == rows["torch eager"]["steps"] == 2
  assert rows["jax"]["time_vs_jax"] == 1.0 and rows["torch eager"]["median_s"] > 0
  assert rows["jax"]["xla_flops"] > 0 and summary["peak_tflops"] > 0
  # Same parameters, batch and number of steps: the same loss at the end.
  assert rows["torch eager"]["final_loss"] == pytest.approx(rows["jax"]["final_loss"], rel=1e-3)
