"""model.scan: the scanned block stacks compute the same step as the unrolled ones."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from mpma_jax import losses, train
from mpma_jax.data import pipeline
from mpma_jax.models import mpma
from mpma_jax.models.mpma import MPMA
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # the slow tier: compiles the whole train step twice


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  batch = pipeline.dummy_batch(config, 4)
  batch["image"] = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
  ids = rng.integers(5, config.model.text.vocab_size, batch["text_ids"].shape).astype(np.int32)
  batch.update(text_ids=ids, mlm_ids=ids, word_mask=np.ones_like(ids))
  batch["mlm_labels"][:, ::3] = ids[:, ::3]
  n = batch["image_restore"].shape[1]
  perm = np.stack([rng.permutation(n) for _ in range(4)]).astype(np.int32)
  batch["image_keep"] = np.sort(perm[:, :batch["image_keep"].shape[1]], axis=1)
  rest = np.setdiff1d(np.arange(n), batch["image_keep"][0])
  batch["image_restore"] = np.tile(np.argsort(np.concatenate([batch["image_keep"][0], rest])),
                                   (4, 1)).astype(np.int32)
  batch["image_keep"] = np.tile(batch["image_keep"][:1], (4, 1))
  return {k: v for k, v in batch.items() if k != "index"}


def _loss_and_grads(config, params, batch):
  model = MPMA.from_config(config)

  def loss(p):
    out = model.apply({"params": p}, batch, deterministic=True, with_itm=True,
                      rngs={"itm": jax.random.key(1)})
    return losses.compute_losses(out, batch, config)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


def test_scanned_step_equals_unrolled_and_layouts_convert():
  config = tiny_config()
  config.model.image.layers = 3  # stacks of 3, 2 and 2 blocks
  config.model.mim.depth = 2
  config.loss.itm = 1.0
  scanned = tiny_config()
  scanned.model.update(config.model.to_dict())
  scanned.loss.itm = 1.0
  scanned.model.scan = True

  params = jax.device_get(train.init_params(config, MPMA.from_config(config), jax.random.key(0)))
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  stacked = mpma.scanned_params(params, config.model)
  # The scanned model's own init has exactly the converted layout.
  own = nn.meta.unbox(
      jax.eval_shape(
          lambda: train.init_params(scanned, MPMA.from_config(scanned), jax.random.key(0))))
  assert jax.tree.structure(own) == jax.tree.structure(stacked)
  for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(own)):
    assert got.shape == want.shape
  assert stacked["image_encoder"]["blocks"]["attn"]["query"]["kernel"].shape[0] == 3
  assert stacked["fusion"]["layers"]["image_layer"]["mlp"]["fc1"]["kernel"].shape[0] == 2
  # Round trip.
  back = mpma.unrolled_params(stacked, config.model)
  jax.tree.map(np.testing.assert_array_equal, back, params)

  batch = _batch(config)
  loss, grads = _loss_and_grads(config, params, batch)
  loss_s, grads_s = _loss_and_grads(scanned, stacked, batch)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  grads_s = mpma.unrolled_params(jax.device_get(grads_s), config.model)
  for (path, g), gs in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_s)):
    np.testing.assert_allclose(gs, g, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
