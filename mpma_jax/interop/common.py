"""What every converter shares: reading PyTorch weight files safely, writing parameters into the
JAX tree with shape checks, and the report of what was imported, skipped and left fresh.

Parameter paths are '/'-joined keys of the (unboxed) Flax parameter tree, e.g.
'text_encoder/layer_0/attn/query/kernel'.
"""
import dataclasses
import os
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from mpma_jax.constants import flatten, unflatten  # noqa: F401  (re-exported)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def find_weights(path: str) -> str:
  """A weight file, or a directory holding model.safetensors / pytorch_model.bin."""
  if os.path.isdir(path):
    for name in WEIGHT_FILES:
      if os.path.exists(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"{path} holds none of {', '.join(WEIGHT_FILES)}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no weight file at {path}")
  return path


# A full (not weights-only) Lightning checkpoint pickles some of Lightning's own classes beside the
# weights: PL 1.x keys the callback states by the callback's class (e.g. ModelCheckpoint, which is
# how M3AE's pre-training checkpoint was saved), and some versions store the hyper-parameters as an
# AttributeDict. weights_only loading refuses any class it does not know, so these are allowed
# under their names but built as inert stand-ins (an AttributeDict as a plain dict, the only kind
# of mapping the loader fills); no Lightning code is imported or run.
_LIGHTNING_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


class _LightningObject:
  """Stand-in for any other Lightning class a checkpoint names."""
  def __init__(self, *args, **kwargs):
    del args, kwargs


def _lightning_standins(path: str) -> list[tuple[Any, str]]:
  """(stand-in, name) for every Lightning class the pickle at `path` refers to."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  except ValueError:  # not a zip checkpoint (pre-1.6 format): nothing to allow
    return []
  return [(dict if n.endswith(".AttributeDict") else _LightningObject, n) for n in names
          if n.startswith(_LIGHTNING_MODULES)]


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """PyTorch tensors by name, as float32 numpy arrays (integer buffers keep their dtype).

  safetensors are read without torch. Pickled files (.bin, .pt, .ckpt) are read only with
  torch.load(weights_only=True), which refuses anything but tensors and plain containers; a
  PyTorch Lightning checkpoint's weights are taken from its 'state_dict' (the Lightning classes
  a full checkpoint names are read as inert stand-ins, see `_lightning_standins`).
  """
  path = find_weights(path)
  if path.endswith(".safetensors"):
    raw = load_file(path)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    with torch.serialization.safe_globals(_lightning_standins(path)):
      obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
      obj = obj["state_dict"]
    if not isinstance(obj, dict):
      raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    raw = {
        k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
        for k, v in obj.items() if isinstance(v, torch.Tensor)
    }
  return {
      k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
      for k, v in raw.items()
  }


@dataclasses.dataclass
class ImportReport:
  """Every parameter of the target tree ends up in `imported` or `initialised`; every source
  tensor in `imported` (by its source name) or `skipped`."""
  source: str
  imported: dict[str, str] = dataclasses.field(default_factory=dict)  # param path -> source name
  skipped: list[str] = dataclasses.field(default_factory=list)  # source tensors not used
  initialised: list[str] = dataclasses.field(default_factory=list)  # params left fresh
  notes: list[str] = dataclasses.field(default_factory=list)  # conversions and caveats to know

  def summary(self) -> str:
    lines = [
        f"import from {self.source}: {len(self.imported)} parameters imported, "
        f"{len(self.skipped)} source tensors skipped, {len(self.initialised)} parameters "
        "newly initialised"
    ]
    lines += [f"  imported     {p} <- {s}" for p, s in sorted(self.imported.items())]
    lines += [f"  skipped      {s}" for s in sorted(self.skipped)]
    lines += [f"  initialised  {p}" for p in sorted(self.initialised)]
    lines += [f"  note         {n}" for n in self.notes]
    return "\n".join(lines)


class Writer:
  """Copies source tensors into a flat parameter dict, checking shapes and recording the report.

    w = Writer(flatten(params), state_dict, 'clip')
    w.put('image_encoder/class_embedding', 'vision_model.embeddings.class_embedding')
    w.put('image_encoder/patch_embed/kernel', name, lambda t: t.transpose(2, 3, 1, 0))
    params, report = w.finish()
  """
  def __init__(self, flat_params: dict[str, Any], state_dict: dict[str, np.ndarray], source: str):
    self.flat = dict(flat_params)
    self.state = state_dict
    self.report = ImportReport(source)
    self._used: set[str] = set()

  def get(self, name: str) -> np.ndarray:
    if name not in self.state:
      raise KeyError(f"{self.report.source}: tensor {name!r} not found")
    self._used.add(name)
    return self.state[name]

  def has(self, name: str) -> bool:
    return name in self.state

  def put(self, path: str, name: str, transform=None, value=None):
    """params[path] = transform(state[name]) (or `value`, made from `name`), shape-checked."""
    if path not in self.flat:
      raise KeyError(f"parameter {path!r} is not in the model (importing {name!r})")
    tensor = self.get(name) if value is None else value
    want = tuple(np.shape(self.flat[path]))
    try:
      converted = np.asarray(transform(tensor) if transform is not None else tensor, np.float32)
    except ValueError as e:  # e.g. a reshape into heads that does not fit
      raise ValueError(f"{self.report.source}: tensor {name!r} of shape {np.shape(tensor)} does "
                       f"not convert to parameter {path!r} of shape {want}: {e}") from e
    if converted.shape != want:
      raise ValueError(f"{self.report.source}: tensor {name!r} has shape {converted.shape} after "
                       f"conversion (source shape {np.shape(tensor)}), but parameter {path!r} "
                       f"has shape {want}")
    tensor = converted
    self.flat[path] = tensor
    self.report.imported[path] = name

  def finish(self, scope: str | tuple[str, ...] = "") -> tuple[Any, ImportReport]:
    """(parameter tree, report); params under `scope` (a prefix, or a tuple of them) that were
    not written count as initialised, source tensors never read count as skipped."""
    self.report.initialised = [
        p for p in self.flat if p.startswith(scope) and p not in self.report.imported
    ]
    self.report.skipped = sorted(set(self.state) - self._used)
    return unflatten(self.flat), self.report


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a PyTorch tensor maps onto a JAX parameter: `to_jax` and its exact inverse `to_torch`
  (transposes and reshapes only, so a round trip reproduces the tensor bit for bit)."""
  to_jax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda t: t, lambda p: p)
# torch Linear weight [out, in] <-> Dense kernel [in, out]
LINEAR = Layout(lambda t: t.T, lambda p: p.T)
# torch Conv2d weight [out, in, kh, kw] <-> nn.Conv kernel [kh, kw, in, out]
CONV = Layout(lambda t: t.transpose(2, 3, 1, 0), lambda p: p.transpose(3, 2, 0, 1))


def heads_in(heads: int) -> Layout:
  """q/k/v Linear weight [H*Dh, D] <-> layers.HeadsIn kernel [D, H, Dh]."""
  return Layout(lambda t: t.T.reshape(t.shape[1], heads, -1), lambda p: p.reshape(p.shape[0], -1).T)


def heads_bias(heads: int) -> Layout:
  """q/k/v bias [H*Dh] <-> layers.HeadsIn bias [H, Dh]."""
  return Layout(lambda t: t.reshape(heads, -1), lambda p: p.reshape(-1))


def heads_out(heads: int) -> Layout:
  """output Linear weight [D, H*Dh] <-> layers.HeadsOut kernel [H, Dh, D]."""
  return Layout(lambda t: t.T.reshape(heads, -1, t.shape[0]),
                lambda p: p.reshape(-1, p.shape[-1]).T)


def save_safetensors(tensors: dict[str, Any], path: str):
  """Writes float32 tensors as a PyTorch-flavoured safetensors file (metadata format 'pt', which
  transformers expects)."""
  arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
  save_file(arrays, path, metadata={"format": "pt"})
