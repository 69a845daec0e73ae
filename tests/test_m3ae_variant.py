"""The `m3ae` pre-training variants (configs/pretrain.py): the fields M3AE sets, and the losses the
project computes under them against M3AE's definitions, recomputed in NumPy from the model's own
outputs: MLM of the pass with the full image, MIM (per-patch targets, sample variance) of the pass
with the full text, ITM as 2-way cross-entropy over the matched and mismatched pairs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpma_jax import losses, optim, sharding, train, validate
from mpma_jax.configs import pretrain
from mpma_jax.constants import CLIP_MEAN, CLIP_STD
from mpma_jax.masking import IGNORE
from mpma_jax.models.mpma import MPMA
from tests.conftest import tiny_config
from tests.models.test_mpma import _init, random_batch


def m3ae_tiny_config():
  """tiny_config() with M3AE's settings, as m3ae_tiny is tiny with them."""
  c = tiny_config()
  c.update_from_flattened_dict(pretrain.M3AE)
  return c


def _flat(config) -> dict:
  out = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v

  walk(config.to_dict(), "")
  return out


def _changed(a, b) -> set:
  fa, fb = _flat(a), _flat(b)
  return {k for k in fa if fa[k] != fb[k]}


def _has_m3ae_fields(config) -> bool:
  flat = _flat(config)
  return all(flat[k] == v for k, v in pretrain.M3AE.items())


def test_m3ae_variant_sets_m3aes_fields_and_nothing_else():
  base, m3ae = pretrain.get_config("base"), pretrain.get_config("m3ae")
  assert m3ae.masking.paired is False
  assert m3ae.model.memory.enabled is False
  assert m3ae.loss.global_ == 0 and m3ae.loss.local == 0
  assert m3ae.loss.itm == 1 and m3ae.loss.mlm == 1 and m3ae.loss.mim == 1
  assert m3ae.model.image.layers == 11  # 11 of CLIP ViT-B/16's 12 blocks
  assert m3ae.model.mim.activation == "quick_gelu" and m3ae.model.mim.eps == 1e-5
  assert m3ae.model.mim.target_var_unbiased is True
  assert m3ae.model.mlm.eps == 1e-12
  assert m3ae.init.text_mlm_head is False
  # M3AE's masking ratios (mim_prob 0.75, mlm_prob 0.15) and MIM layer (3) are base's.
  assert (m3ae.masking.image_ratio, m3ae.masking.text_ratio) == (0.75, 0.15)
  assert m3ae.model.mim.layer == 3
  assert _changed(base, m3ae) == set(pretrain.M3AE) | {"model.image.layers", "variant"}
  # m3ae_tiny: tiny with the same fields (tiny's MLM head eps is 1e-12 already), at tiny's depth.
  tiny, m3ae_tiny = pretrain.get_config("tiny"), pretrain.get_config("m3ae_tiny")
  assert _has_m3ae_fields(m3ae) and _has_m3ae_fields(m3ae_tiny)
  assert _changed(tiny, m3ae_tiny) == set(pretrain.M3AE) - {"model.mlm.eps"} | {"variant"}
  assert m3ae_tiny.model.image.layers == tiny.model.image.layers
  validate.check(m3ae, 1)
  validate.check(m3ae_tiny, 1)
  with pytest.raises(ValueError, match="m3ae_tiny"):
    pretrain.get_config("m3ae_small")


# --- M3AE's losses, by hand --------------------------------------------------------------------
def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _cross_entropy(logits, labels):
  """Mean over rows of -log softmax(logits)[label]; logits [M, C], labels [M]."""
  logp = _log_softmax(np.asarray(logits, np.float64))
  return -np.mean(logp[np.arange(len(labels)), labels])


def ref_mlm(logits, labels):
  """Cross-entropy over the chosen text tokens; logits [B, L, V], labels [B, L]."""
  chosen = labels != IGNORE
  return _cross_entropy(np.asarray(logits)[chosen], labels[chosen])


def ref_mim(pred, images, restore, num_kept, patch):
  """MSE over the masked patches against per-patch normalised pixels: (x - mean) /
  sqrt(var + 1e-6), var the sample variance over the patch's p*p*3 values."""
  x = (images.astype(np.float64) / 255.0 - CLIP_MEAN) / CLIP_STD  # [B, H, W, 3]
  b, h, w, c = x.shape
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  target = x.reshape(b, -1, patch * patch * c)  # [B, N, p*p*3], row-major grid
  mean = target.mean(-1, keepdims=True)
  var = target.var(-1, ddof=1, keepdims=True)
  target = (target - mean) / np.sqrt(var + 1e-6)
  per_patch = ((np.asarray(pred, np.float64) - target)**2).mean(-1)  # [B, N]
  masked = restore >= num_kept
  return per_patch[masked].mean()


def _m3ae_passes(m, b):
  """M3AE's passes built from the model's parts: MLM logits of (full image, masked text), MIM
  predictions of (masked image, full text), and the ITM logits of every (image (i + s) % B, text i),
  [B (shift s), B (text i), 2]."""
  mask = b["text_mask"]
  full_image = m.embed_image(b["image"])  # [B, 1+N, d]
  masked_image = m.embed_image(b["image"], b["image_keep"])  # [B, 1+n, d]
  full_text = m.embed_text(b["text_ids"], mask)  # [B, L, d]
  masked_text = m.embed_text(b["mlm_ids"], mask)  # [B, L, d]
  mlm_logits = m.mlm_head(m.fuse(full_image, masked_text, mask)["text"])  # [B, L, V]
  mim_stream = m.fuse(masked_image, full_text, mask)["image_at_mim_layer"]  # [B, 1+n, d]
  mim_pred = m.mim_decoder(mim_stream, b["image_restore"])  # [B, N, p*p*3]
  n = full_image.shape[0]
  shifted = [full_image[(np.arange(n) + s) % n] for s in range(n)]  # B x [B, 1+N, d]
  pairs = jnp.stack([m.itm_logits(image, full_text, mask) for image in shifted])  # [B, B, 2]
  return mlm_logits, mim_pred, pairs


def _itm_pairs(itm_logits, itm_labels, all_pairs):
  """The image each text was paired with, found by matching the project's ITM logits [B, 2]
  against every pairing's [B (shift), B, 2]: shift 0 (its own image) for a matched pair."""
  dist = np.abs(all_pairs - np.asarray(itm_logits)[None]).max(-1)  # [B (shift), B]
  shift = dist.argmin(0)  # [B]
  best = dist[shift, np.arange(len(shift))]
  second = np.sort(dist, axis=0)[1]
  assert best.max() < 1e-5 and second.min() > 10 * best.max(), (best, second)
  np.testing.assert_array_equal(shift == 0, np.asarray(itm_labels) == 1)
  return shift


@pytest.fixture(scope="module")
def m3ae_setup():
  config = m3ae_tiny_config()
  batch = random_batch(config, batch_size=6, seed=11)
  model, params = _init(config, batch)
  return config, batch, model, params


def _references(config, batch, model, params):
  mlm_logits, mim_pred, all_pairs = jax.jit(
      lambda p, b: model.apply({"params": p}, b, method=_m3ae_passes))(params, batch)
  num_kept = batch["image_keep"].shape[1]
  return {
      "mlm": ref_mlm(mlm_logits, batch["mlm_labels"]),
      "mim": ref_mim(mim_pred, batch["image"], batch["image_restore"], num_kept,
                     config.model.image.patch),
  }, np.asarray(all_pairs)


@pytest.mark.slow  # two compiles of the tiny model
def test_m3ae_losses_equal_m3aes_definitions(m3ae_setup):
  config, batch, model, params = m3ae_setup
  # The project's objective as the train step computes it (train.make_train_step's loss_fn).
  kwargs = dict(with_itm=config.loss.itm > 0, paired=config.masking.paired,
                rngs={"itm": jax.random.key(3)})
  out = jax.jit(lambda p, b: model.apply({"params": p}, b, **kwargs))(params, batch)
  total, got = losses.compute_losses(out, batch, config)
  assert not {"global", "local"} & set(got)  # GLA off: not computed at all
  want, all_pairs = _references(config, batch, model, params)
  labels = np.asarray(out["itm_labels"])
  assert 0 < labels.sum() < len(labels)  # both kinds of pairs in this batch
  shift = _itm_pairs(out["itm_logits"], labels, all_pairs)
  want["itm"] = _cross_entropy(all_pairs[shift, np.arange(len(shift))], labels)
  for k in ("mlm", "mim", "itm"):
    np.testing.assert_allclose(float(got[k]), want[k], rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(float(total), want["mlm"] + want["mim"] + want["itm"], rtol=1e-5)


@pytest.mark.slow  # compiles a train step
def test_m3ae_train_step_reports_mlm_mim_itm_of_m3aes_passes(m3ae_setup):
  """The train step of the variant computes MLM, MIM and ITM only, MLM and MIM as M3AE's passes
  give them on the step's (pre-update) parameters."""
  config, batch, model, params = m3ae_setup
  config.mesh.update(data=1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rules = sharding.rules(config.mesh)
  tx = optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = train.create_train_state(config, model, tx, mesh, rules)
    initial = jax.device_get(state)
    step = train.make_train_step(config, model, tx, shardings, mesh)
    _, metrics = step(jax.device_put(initial, shardings), sharding.global_batch(batch, mesh))
  metrics = jax.device_get(metrics)
  assert {"mlm", "mim", "itm", "itm_acc"} <= set(metrics)
  assert not {"global", "local"} & set(metrics)
  want, _ = _references(config, batch, MPMA.from_config(config), initial.params)
  for k in ("mlm", "mim"):
    np.testing.assert_allclose(float(metrics[k]), want[k], rtol=1e-5, err_msg=k)
  assert 0.3 < float(metrics["itm"]) < 1.2  # 2-way cross-entropy of a fresh head: ~log 2
