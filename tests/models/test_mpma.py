"""The whole model: shapes, parameter count, gradient flow, padding invariance, M3AE mode."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpma_jax import losses, masking, train
from mpma_jax.configs.pretrain import get_config
from mpma_jax.data import pipeline
from mpma_jax.models.mpma import MPMA
from tests.conftest import tiny_config


def random_batch(config, batch_size=4, seed=0, num_words=None):
  """A batch with the pipeline's fields, random contents, `num_words` real words per text."""
  rng = np.random.default_rng(seed)
  batch = pipeline.dummy_batch(config, batch_size)
  length, vocab = config.data.max_len, 100
  n = batch["image_restore"].shape[1]
  batch["image"] = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
  words = num_words or length - 2
  ids = np.zeros((batch_size, length), np.int32)  # pad = 0
  ids[:, 0], ids[:, words + 1] = 2, 3  # [CLS] ... [SEP]
  ids[:, 1:words + 1] = rng.integers(5, vocab, (batch_size, words))
  batch["text_ids"] = ids
  batch["text_mask"] = (ids != 0).astype(np.int32)
  batch["word_mask"] = (ids >= 5).astype(np.int32)
  for b in range(batch_size):
    m = masking.paired_masks(seed, 0, b, num_patches=n, image_mask_ratio=0.75, input_ids=ids[b],
                             candidate_mask=ids[b] >= 5, text_mask_ratio=0.15, mask_id=4,
                             random_ids=np.arange(5, vocab, dtype=np.int32))
    for k in ("image_keep", "image_restore", "mlm_ids", "mlm_labels"):
      batch[k][b] = m[k]
  return batch


def _init(config, batch):
  model = MPMA.from_config(config)
  init = jax.jit(lambda b: model.init({"params": jax.random.key(0), "itm": jax.random.key(1)}, b,
                                      with_itm=config.loss.itm > 0))
  params = nn.meta.unbox(init(batch)["params"])
  return model, params


def test_tiny_output_shapes():
  config = get_config("tiny")
  m = config.model
  model = MPMA.from_config(config)
  batch = pipeline.dummy_batch(config, 2)
  out = jax.eval_shape(lambda: model.init_with_output(
      {"params": jax.random.key(0), "itm": jax.random.key(0)}, batch, with_itm=True)[0])
  n, length = (m.image.size // m.image.patch)**2, config.data.max_len
  assert out["mim_pred"].shape == (2, n, m.image.patch**2 * 3)
  assert out["mlm_logits"].shape == (2, length, m.text.vocab_size)
  assert out["image_gla"].shape == (2, 1 + n, m.gla.dim)  # clean pass: every patch
  assert out["text_gla"].shape == (2, length, m.gla.dim)
  assert out["itm_logits"].shape == (2, 2)
  assert all(v.dtype == jnp.float32 for k, v in out.items() if k != "itm_labels")


def count_params(config) -> int:
  model = MPMA.from_config(config)
  abstract = jax.eval_shape(lambda: train.init_params(config, model, jax.random.key(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract)))


@pytest.mark.slow
def test_base_parameter_count():
  config = get_config("base")
  total = count_params(config)
  print(f"base parameters: {total:,}")
  model = MPMA.from_config(config)
  abstract = nn.meta.unbox(
      jax.eval_shape(lambda: train.init_params(config, model, jax.random.key(0))))
  per_module = {
      k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in abstract.items()
  }
  print({k: f"{v:,}" for k, v in per_module.items()})
  # Known sizes: CLIP ViT-B/16's visual tower (85,799,424 at 224 px, without its output projection)
  # with 128 more position rows at 288 px; RoBERTa-base (124,645,632) without its pooler (768² + 768).
  assert per_module["image_encoder"] == 85_799_424 + (325 - 197) * 768
  assert per_module["text_encoder"] == 124_645_632 - (768 * 768 + 768)
  # 12 co-attention layers of ~9.45M, a 768 x 50,265 MLM decoder, the MIM decoder, memory, heads.
  assert 370e6 < total < 380e6, total


@pytest.mark.slow
def test_every_parameter_gets_a_gradient():
  config = tiny_config()
  config.loss.itm = 1.0  # exercise every head
  batch = random_batch(config, seed=1)
  model, params = _init(config, batch)

  def loss(p):
    out = model.apply({"params": p}, batch, deterministic=False, with_itm=True,
                      rngs={"dropout": jax.random.key(2), "itm": jax.random.key(3)})
    return losses.compute_losses(out, batch, config)[0]

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g) != 0)]
  assert not dead, f"no gradient reaches: {dead}"
  assert all(np.isfinite(np.asarray(g)).all() for _, g in flat)


@pytest.mark.slow
def test_alignment_losses_unchanged_by_extra_padding():
  """Local (and global) alignment ignore padding: the same texts padded to a longer length give the
  same GLA losses."""
  config = tiny_config()
  config.model.gla.features_from = "clean"
  batch = random_batch(config, seed=2, num_words=6)
  longer = tiny_config()
  longer.data.max_len = config.data.max_len + 10
  padded = {k: v for k, v in batch.items()}
  for k in ("text_ids", "text_mask", "word_mask", "mlm_ids"):
    padded[k] = np.pad(batch[k], ((0, 0), (0, 10)))
  padded["mlm_labels"] = np.pad(batch["mlm_labels"], ((0, 0), (0, 10)), constant_values=-100)
  model, params = _init(config, batch)
  metrics_of = lambda cfg, b: jax.jit(lambda b: losses.compute_losses(
      model.apply({"params": params}, b), b, cfg)[1])(b)
  short, long = metrics_of(config, batch), metrics_of(longer, padded)
  for k in ("global", "local"):
    np.testing.assert_allclose(long[k], short[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_m3ae_mode_has_no_memory_and_no_gla_cost():
  """memory off + GLA weights 0 + ITM 1 = M3AE: no memory parameters, and the GLA heads do not
  influence the loss."""
  config = tiny_config()
  config.model.memory.enabled = False
  config.loss.update(global_=0.0, local=0.0, itm=1.0)
  batch = random_batch(config, seed=3)
  model, params = _init(config, batch)
  assert "memory" not in params
  out = jax.jit(lambda b: model.apply({"params": params}, b, with_itm=True, rngs=
                                      {"itm": jax.random.key(0)}))(batch)
  _, metrics = losses.compute_losses(out, batch, config)
  assert set(metrics) >= {"mlm", "mim", "itm"} and not {"global", "local"} & set(metrics)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_losses():
  """model.dtype = bfloat16: the same parameters give float32 losses close to the float32 ones."""
  config = tiny_config()
  batch = random_batch(config, seed=4)
  model, params = _init(config, batch)
  bf16 = tiny_config()
  bf16.model.dtype = "bfloat16"
  model16 = MPMA.from_config(bf16)
  run = lambda m, cfg: jax.jit(lambda b: losses.compute_losses(m.apply({"params": params}, b), b,
                                                               cfg)[1])(batch)
  full, half = run(model, config), run(model16, bf16)
  for k in ("mlm", "mim", "global", "local"):
    assert half[k].dtype == jnp.float32
    np.testing.assert_allclose(half[k], full[k], rtol=0.05)
