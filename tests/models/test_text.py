import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpma_jax.models.text import TextEncoder, position_ids


def test_position_ids_follow_hugging_face_conventions():
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(position_ids(mask, "bert", 0), [[0, 1, 2, 3, 4]] * 2)
  # RoBERTa: real tokens count from pad_id + 1, padding sits at pad_id.
  np.testing.assert_array_equal(position_ids(mask, "roberta", 1),
                                [[2, 3, 4, 1, 1], [2, 3, 4, 5, 6]])
  with pytest.raises(ValueError, match="position_style"):
    position_ids(mask, "gpt", 0)


@pytest.mark.parametrize("style", ["bert", "roberta"])
def test_real_tokens_ignore_padding(style):
  enc = TextEncoder(vocab_size=50, width=16, layers=2, heads=2, mlp_dim=32, max_positions=20,
                    pad_id=1, position_style=style)
  ids = jnp.array([[0, 7, 9, 2]])
  padded = jnp.array([[0, 7, 9, 2, 1, 1, 1]])
  variables = enc.init(jax.random.key(0), padded, jnp.ones_like(padded))
  short = enc.apply(variables, ids, jnp.ones_like(ids))
  long = enc.apply(variables, padded, (padded != 1).astype(jnp.int32))
  np.testing.assert_allclose(long[:, :4], short, atol=1e-5)
