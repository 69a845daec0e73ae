"""What the JAX model and its PyTorch port (interop/torch_mpma.py) share, in plain Python and
numpy only (no jax, flax or ml_collections), so that the PyTorch port loads without JAX.

  CLIP_MEAN, CLIP_STD  CLIP's pixel normalisation (RGB); models/vit.py imports them from here.
  TEXT, IMAGE          modality-type ids; models/mpma.py imports them from here.
  sincos_2d            the MIM decoder's fixed position embedding; models/decoders.py imports it.
  flatten, unflatten   nested dict <-> {'a/b/c': leaf}, as interop/common.flatten / unflatten
                       (flax.traverse_util semantics: empty sub-dicts are dropped).
"""
from collections.abc import Mapping
from typing import Any

import numpy as np

# CLIP's pixel normalisation (RGB).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

TEXT, IMAGE = 0, 1  # modality-type ids [M3AE]


def sincos_2d(grid: int, width: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [1 + grid*grid, width] (MAE); the CLS row is zeros."""
  if width % 4:
    raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {width}")
  omega = 1.0 / 10000**(np.arange(width // 4, dtype=np.float64) / (width // 4))  # [W/4]
  ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                       indexing="ij")
  parts = []
  for coord in (xs.reshape(-1), ys.reshape(-1)):  # half the channels encode each axis
    angle = coord[:, None] * omega[None, :]  # [N, W/4]
    parts += [np.sin(angle), np.cos(angle)]
  pos = np.concatenate(parts, axis=1)  # [N, W]
  return np.concatenate([np.zeros((1, width)), pos], axis=0).astype(np.float32)


def flatten(tree: Any) -> dict[str, Any]:
  """Nested mapping (dict, flax FrozenDict, ...) -> {'a/b/c': leaf}; empty sub-mappings dropped."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"expected a nested mapping of parameters, got {type(tree).__name__}")
  out = {}

  def visit(node, prefix):
    for key, value in node.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        visit(value, path)
      else:
        out[path] = value

  visit(tree, "")
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b/c': leaf} -> nested plain dicts (the inverse of `flatten`)."""
  out: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out
