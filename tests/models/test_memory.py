import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpma_jax.models.memory import Memory, kth_largest

WIDTH = 8


def _params(module, x):
  return jax.tree.map(np.asarray, nn.meta.unbox(module.init(jax.random.key(0), x)["params"]))


def _apply(module, params, x):
  return np.asarray(module.apply({"params": params}, x))


def _dense(p, inp):  # DenseGeneral [D] -> [H, Dh]
  return np.einsum("...d,dhk->...hk", inp, p["kernel"]) + p["bias"]


def test_topk_all_slots_is_plain_softmax_attention_over_memory():
  slots, heads = 16, 2
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, 5, WIDTH)))  # [B, L, D]
  mem = Memory(slots=slots, topk=slots, heads=heads)
  p = _params(mem, x)
  q = _dense(p["query"], x)  # [B, L, H, Dh]
  k, v = _dense(p["key"], p["memory"]), _dense(p["value"], p["memory"])  # [S, H, Dh]
  scores = np.einsum("blhd,shd->bhls", q, k) / np.sqrt(WIDTH // heads)
  w = np.exp(scores - scores.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  read = np.einsum("bhls,shd->blhd", w, v)
  want = np.einsum("blhd,hde->ble", read, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(_apply(mem, p, x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("topk", [1, 4, 16])
def test_masked_and_gather_implementations_agree(topk):
  x = jax.random.normal(jax.random.key(2), (2, 7, WIDTH))
  masked, gather = Memory(16, topk, 2, impl="masked"), Memory(16, topk, 2, impl="gather")
  p = _params(masked, x)
  np.testing.assert_allclose(_apply(masked, p, x), _apply(gather, p, x), rtol=1e-5, atol=1e-6)


def test_slots_outside_the_topk_do_not_matter():
  """Nudging the lowest-scoring slot changes nothing with top-k = 2, but does with top-k = all."""
  x = np.asarray(jax.random.normal(jax.random.key(3), (1, 1, WIDTH)))
  p = _params(Memory(16, 2, 1), x)
  q = _dense(p["query"], x)[0, 0, 0]  # [Dh]
  worst = int(np.argmin(_dense(p["key"], p["memory"])[:, 0] @ q))
  nudged = dict(p, memory=p["memory"].copy())
  nudged["memory"][worst] *= 1.001
  for topk, changes in ((2, False), (16, True)):
    mem = Memory(16, topk, 1)
    diff = np.abs(_apply(mem, nudged, x) - _apply(mem, p, x)).max()
    assert (diff > 1e-9) == changes, (topk, diff)


def test_rejects_bad_topk():
  with pytest.raises(ValueError, match="topk"):
    Memory(4, 5, 1).init(jax.random.key(0), jnp.zeros((1, 2, WIDTH)))


@pytest.mark.parametrize("slots", [64, 60, 37])  # counted in groups of 32, 30 and 1 slots
@pytest.mark.parametrize("k", [1, 3, 16, 37])
def test_kth_largest_is_exactly_top_k(k, slots):
  """Bit-for-bit lax.top_k's k-th value: signs, ties, +-0, infinities, tiny and huge magnitudes."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 7, slots)).astype(np.float32) * np.float32(10.0)**rng.integers(
      -30, 30, size=(5, 7, slots))
  x[0, 0] = 0.0
  x[0, 1, ::2] = -0.0
  x[1, 0] = 1.5  # all tied
  x[1, 1, :30] = -2.0  # ties across the k-th position
  x[2, 0, :3] = [np.inf, -np.inf, np.finfo(np.float32).max]
  x[2, 1] = -np.abs(x[2, 1])  # all negative
  want = np.asarray(jax.lax.top_k(jnp.asarray(x), k)[0][..., -1:])
  got = np.asarray(jax.jit(kth_largest, static_argnums=1)(jnp.asarray(x), k))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got >= 0, want >= 0)  # same value, same mask either way


def test_kth_largest_counts_in_one_pass_per_round():
  """Each round's compare is fused into its row sum: no reduce-window (XLA:CPU's rewrite of a sum
  over more than 32 elements, which cannot fuse the compare and so materialised an int32 copy of
  the scores in every round)."""
  hlo = jax.jit(kth_largest, static_argnums=1).lower(jnp.zeros((4, 3, 10, 512)), 32).compile()
  assert "reduce-window" not in hlo.as_text()
  assert "reduce-window" in jax.jit(  # the check can fail: a plain sum over 512 slots has one
      lambda x: jnp.sum(x >= 0.5, axis=-1, dtype=jnp.int32)).lower(jnp.zeros(
          (4, 3, 10, 512))).compile().as_text()


def test_kth_largest_has_no_gradient():
  x = jax.random.normal(jax.random.key(4), (3, 16))
  g = jax.grad(lambda x: jnp.sum(kth_largest(x, 4) * x))(x)  # d/dx only through `* x`
  np.testing.assert_array_equal(g, np.broadcast_to(kth_largest(x, 4), x.shape))


def test_masked_read_stays_split_over_the_batch():
  """With the batch split over 8 devices, the masked top-k read compiles without any all-gather
  (lax.top_k made XLA gather the whole [B, H, L, S] score tensor onto every device)."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  module = Memory(slots=256, topk=8, heads=2, impl="masked")
  x = jnp.ones((8, 16, 64))
  params = module.init(jax.random.key(0), x)
  fn = jax.jit(module.apply, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh,
                                                                                   P("data"))))
  assert "all-gather" not in fn.lower(params, x).compile().as_text()
