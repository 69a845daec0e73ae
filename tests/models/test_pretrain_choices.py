"""The pre-training pass under its config choices: the MLM head's LayerNorm epsilon, ITM on the
unmasked inputs, and M3AE's unpaired masking (masking.paired = False)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from mpma_jax import losses, optim, sharding, train
from mpma_jax.models.decoders import MLMHead
from mpma_jax.models.mpma import MPMA
from tests.conftest import tiny_config
from tests.models.test_mpma import _init, random_batch

pytestmark = pytest.mark.slow  # several model variants, each compiled


def _apply(config, params, batch, **kwargs):
  model = MPMA.from_config(config)
  run = lambda p, b: model.apply({"params": p}, b, rngs={"itm": jax.random.key(5)}, **kwargs)
  return jax.jit(run)(params, batch)


def _fused_text(config, params, batch):
  """The final text stream of the paired pass [B, L, d], the MLM head's input."""
  def run(m, b):
    image = m.embed_image(b["image"], b["image_keep"])
    text = m.embed_text(b["mlm_ids"], b["text_mask"])
    return m.fuse(image, text, b["text_mask"])["text"]

  return MPMA.from_config(config).apply({"params": params}, batch, method=run)


def test_mlm_head_layer_norm_eps_is_model_mlm_eps():
  """model.mlm.eps, not model.text.eps, is the MLM head's LayerNorm epsilon."""
  config = tiny_config()
  batch = random_batch(config, seed=5)
  _, params = _init(config, batch)
  fused = _fused_text(config, params, batch)
  outs = {}
  for eps in (1e-12, 0.5):
    config.model.mlm.eps = eps
    outs[eps] = _apply(config, params, batch)
    want = MLMHead(config.model.text.vocab_size, eps).apply({"params": params["mlm_head"]}, fused)
    np.testing.assert_allclose(outs[eps]["mlm_logits"], want, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(outs[0.5]["mlm_logits"] - outs[1e-12]["mlm_logits"])) > 1e-3
  np.testing.assert_array_equal(outs[0.5]["mim_pred"], outs[1e-12]["mim_pred"])
  config.model.text.eps = 0.5  # the text encoder's epsilon does not reach the head
  config.model.mlm.eps = 1e-12
  fused = _fused_text(config, params, batch)
  want = MLMHead(config.model.text.vocab_size, 1e-12).apply({"params": params["mlm_head"]}, fused)
  got = _apply(config, params, batch)["mlm_logits"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_itm_reads_the_unmasked_inputs_whatever_gla_features_from():
  """With gla.features_from = masked, GLA reuses the masked pass but ITM still fuses the full image
  with the unmasked text: the same logits as with features_from = clean, and as fusing them by
  hand."""
  config = tiny_config()
  config.loss.itm = 1.0
  batch = random_batch(config, seed=6)
  _, params = _init(config, batch)
  outs = {}
  for source in ("clean", "masked"):
    config.model.gla.features_from = source
    outs[source] = _apply(config, params, batch, with_itm=True)
  np.testing.assert_array_equal(outs["masked"]["itm_labels"], outs["clean"]["itm_labels"])
  np.testing.assert_allclose(outs["masked"]["itm_logits"], outs["clean"]["itm_logits"], rtol=1e-5,
                             atol=1e-6)
  assert outs["masked"]["image_gla"].shape[1] < outs["clean"]["image_gla"].shape[1]  # masked GLA

  def by_hand(m, b, labels):
    image = m.embed_image(b["image"])  # [B, 1+N, d]
    text = m.embed_text(b["text_ids"], b["text_mask"])  # [B, L, d]
    matched = m.itm_logits(image, text, b["text_mask"])
    return matched, labels

  matched, labels = MPMA.from_config(config).apply({"params": params}, batch,
                                                   outs["masked"]["itm_labels"], method=by_hand)
  rows = np.asarray(labels) == 1  # matched pairs keep their own image
  assert rows.any()
  got = np.asarray(outs["masked"]["itm_logits"])[rows]
  np.testing.assert_allclose(got, np.asarray(matched)[rows], rtol=1e-5, atol=1e-6)


def test_unpaired_masking_is_m3ae_two_passes():
  """paired=False (masking.paired): the MLM loss is the one of a pass with the full image and the
  masked text, the MIM loss the one of a pass with the masked image and the full text, and GLA
  reads the unmasked features."""
  config = tiny_config()
  config.model.gla.features_from = "masked"  # overridden by the unpaired passes
  batch = random_batch(config, seed=7)
  _, params = _init(config, batch)
  metrics = lambda out, b: losses.compute_losses(out, b, config)[1]
  unpaired = _apply(config, params, batch, paired=False)
  got = metrics(unpaired, batch)

  b, n = batch["image_restore"].shape
  full_image = dict(batch, image_keep=np.tile(np.arange(n, dtype=np.int32), (b, 1)))  # [B, N]
  want_mlm = _apply(config, params, full_image)
  full_text = dict(batch, mlm_ids=batch["text_ids"])
  want_mim = _apply(config, params, full_text)
  np.testing.assert_allclose(got["mlm"], metrics(want_mlm, full_image)["mlm"], rtol=1e-5)
  np.testing.assert_allclose(got["mim"], metrics(want_mim, full_text)["mim"], rtol=1e-5)
  # The MIM loss of a fresh model hardly depends on the text: compare the predictions themselves.
  np.testing.assert_allclose(unpaired["mim_pred"], want_mim["mim_pred"], rtol=0, atol=2e-6)
  np.testing.assert_allclose(unpaired["mlm_logits"], want_mlm["mlm_logits"], rtol=0, atol=2e-6)

  paired = _apply(config, params, batch)  # both masked in one pass: other predictions
  assert abs(float(metrics(paired, batch)["mlm"]) - float(got["mlm"])) > 1e-4
  assert np.max(np.abs(paired["mim_pred"] - unpaired["mim_pred"])) > 1e-6
  config.model.gla.features_from = "clean"
  clean = _apply(config, params, batch)
  for k in ("image_gla", "text_gla"):
    np.testing.assert_allclose(unpaired[k], clean[k], rtol=1e-5, atol=1e-6)


def test_masking_paired_reaches_the_train_step():
  """The train step runs the pass that masking.paired names: its MLM and MIM losses are those of
  MPMA.__call__(paired=...) on the same parameters (tiny: no dropout)."""
  config = tiny_config()
  config.mesh.update(data=1)
  batch = random_batch(config, batch_size=4, seed=8)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rules = sharding.rules(config.mesh)
  model, tx = MPMA.from_config(config), optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = train.create_train_state(config, model, tx, mesh, rules)
    initial = jax.device_get(state)
    got = {}
    for paired in (True, False):
      config.masking.paired = paired
      step = train.make_train_step(config, model, tx, shardings, mesh)
      _, metrics = step(jax.device_put(initial, shardings), sharding.global_batch(batch, mesh))
      got[paired] = jax.device_get(metrics)
  for paired in (True, False):
    out = _apply(config, initial.params, batch, paired=paired)
    want = losses.compute_losses(out, batch, config)[1]
    for k in ("mlm", "mim"):
      np.testing.assert_allclose(got[paired][k], want[k], rtol=1e-5, err_msg=f"{paired} {k}")
  assert abs(float(got[True]["mlm"]) - float(got[False]["mlm"])) > 1e-4
