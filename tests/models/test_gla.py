import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mpma_jax.models import gla


def _normed(key, shape):
  return np.asarray(gla.l2_normalize(jax.random.normal(key, shape)))


def _inputs(bi=3, bt=4, p=5, length=6, g=8):
  image = _normed(jax.random.key(0), (bi, p, g))
  text = _normed(jax.random.key(1), (bt, length, g))
  word_mask = np.zeros((bt, length), bool)
  for j, n in enumerate([1, 3, 6, 2][:bt]):
    word_mask[j, :n] = True
  return image, text, word_mask


def _filip_reference(image, text, word_mask):
  bi, bt = len(image), len(text)
  i2t, t2i = np.zeros((bi, bt)), np.zeros((bt, bi))
  for i in range(bi):
    for j in range(bt):
      words = text[j][word_mask[j]]  # [n, G]
      sim = image[i] @ words.T  # [P, n]
      i2t[i, j] = sim.max(1).mean()
      t2i[j, i] = sim.max(0).mean()
  return i2t, t2i


@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_filip_matches_the_definition(chunk):
  image, text, word_mask = _inputs()
  i2t, t2i = gla.filip_similarity(image, text, word_mask, chunk=chunk)
  want_i2t, want_t2i = _filip_reference(image, text, word_mask)
  np.testing.assert_allclose(i2t, want_i2t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t2i, want_t2i, rtol=1e-5, atol=1e-6)


def _attention_reference(image, text, word_mask, a=4.0, b=5.0):
  out = np.zeros((len(image), len(text)))
  for i in range(len(image)):
    for j in range(len(text)):
      words = text[j][word_mask[j]]
      sim = words @ image[i].T  # [n, P]
      attn = np.exp(a * sim)
      attn /= attn.sum(1, keepdims=True)
      ctx = attn @ image[i]
      ctx /= np.linalg.norm(ctx, axis=1, keepdims=True)
      score = (ctx * words).sum(1)
      out[i, j] = np.log(np.exp(b * score).sum()) / b
  return out


def test_attention_local_matches_the_definition():
  image, text, word_mask = _inputs()
  sim, sim_t = gla.attention_similarity(image, text, word_mask, 4.0, 5.0, chunk=2)
  np.testing.assert_allclose(sim, _attention_reference(image, text, word_mask), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(sim_t, np.asarray(sim).T)


@pytest.mark.parametrize("fn", [gla.filip_similarity, gla.attention_similarity])
def test_padding_does_not_change_local_similarity(fn):
  image, text, word_mask = _inputs()
  pad = _normed(jax.random.key(9), (text.shape[0], 5, text.shape[2]))  # junk "padding" tokens
  text_padded = np.concatenate([text, pad], axis=1)
  mask_padded = np.concatenate([word_mask, np.zeros((len(text), 5), bool)], axis=1)
  for got, want in zip(fn(image, text_padded, mask_padded), fn(image, text, word_mask)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_text_without_words_is_finite():
  image, text, word_mask = _inputs()
  word_mask[0] = False
  grads = jax.grad(lambda t: sum(x.sum() for x in gla.filip_similarity(image, t, word_mask)))(text)
  assert np.isfinite(np.asarray(grads)).all()
  assert np.all(np.asarray(gla.filip_similarity(image, text, word_mask)[0])[:, 0] == 0)


@pytest.mark.parametrize("log_t", [np.log(0.005), np.log(0.01) - 1e-3, np.log(0.07)])
def test_clamped_temperature_keeps_its_gradient(log_t):
  """Below temperature_min the value is the floor, but the gradient with respect to the log
  temperature is exp(log_t), the same as without a floor, so the parameter can recover."""
  heads = gla.GLAHeads(dim=4, temperature_min=0.01)
  unclamped = gla.GLAHeads(dim=4, temperature_min=0.0)
  params = heads.init(jax.random.key(0), jnp.zeros((1, 2, 8)), jnp.zeros((1, 3, 8)))["params"]
  params = {
      **params, "log_temperature_global": jnp.float32(log_t),
      "log_temperature_local": jnp.float32(log_t)
  }

  def temperature(p, module, which):
    return module.apply({"params": p}, method=module.temperatures)[which]

  for which in (0, 1):
    value = temperature(params, heads, which)
    assert value == np.float32(max(np.exp(np.float32(log_t)), np.float32(0.01)))
    grad = jax.grad(temperature)(params, heads, which)
    name = ("log_temperature_global", "log_temperature_local")[which]
    want = jax.grad(temperature)(params, unclamped, which)[name]
    assert grad[name] != 0
    np.testing.assert_allclose(grad[name], want, rtol=1e-6)
    np.testing.assert_allclose(grad[name], np.exp(log_t), rtol=1e-6)


def test_clamp_straight_through():
  x = jnp.array([0.001, 0.01, 0.5])
  np.testing.assert_array_equal(gla.clamp_straight_through(x, 0.01), jnp.maximum(x, 0.01))
  grad = jax.grad(lambda x: jnp.sum(gla.clamp_straight_through(x, 0.01) * jnp.arange(1., 4.)))(x)
  np.testing.assert_array_equal(grad, [1., 2., 3.])


@pytest.mark.parametrize("fn", [gla.filip_similarity, gla.attention_similarity])
def test_local_similarity_on_a_mesh_keeps_each_chips_images_and_the_values(fn):
  """With the batch split over 8 devices, the chunked loop takes each chip's own images and the
  texts are gathered once: the same similarities and gradients as without a mesh, and the images
  never move (lax.map's contiguous chunks made XLA all-gather every image onto every chip in
  every step, forward and backward)."""
  from mpma_jax import aot, sharding  # pylint: disable=g-import-not-at-top
  image, text, _ = _inputs(bi=32, bt=16, p=5, length=6, g=8)  # 2 steps of 2 images per chip
  word_mask = np.arange(6)[None, :] < np.arange(16)[:, None] % 6 + 1  # [16, 6]: 1 to 6 words
  loss = lambda im, tx: sum(jnp.sum(s * s) for s in fn(im, tx, word_mask, chunk=2))
  want, want_grads = jax.value_and_grad(loss, argnums=(0, 1))(image, text)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 8, "tensor": 1}))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  with jax.set_mesh(mesh):
    args = (jax.device_put(image, rows), jax.device_put(text, rows))
    got, got_grads = step(*args)
    hlo = step.lower(*args).compile().as_text()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  gathers = [c for c in aot.collectives(hlo, 8) if c.kind == "all-gather"]
  assert gathers and all(c.count == 1 for c in gathers), gathers
  assert sum(c.bytes for c in gathers) <= text.nbytes + word_mask.nbytes, gathers
