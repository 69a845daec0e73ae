import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpma_jax.models.memory import Memory

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
