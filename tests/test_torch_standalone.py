"""The PyTorch MPMA loads and runs without JAX: a model exported here is read
back with `MPMATorch.from_pretrained` in a Python process where jax, flax, ml_collections, optax
and orbax cannot be imported, and its outputs equal the JAX model's. Also: the shared constants
module (mpma_jax/constants.py) agrees with the JAX side."""
import inspect
import json
import os
import subprocess
import sys
import textwrap

import flax
from flax import traverse_util
import jax
import numpy as np

from mpma_jax import constants
from mpma_jax.interop import torch_mpma
from mpma_jax.models import decoders, mpma, vit
from tests.test_torch_mpma import (
    CASES,
    TOL,
    make_config,
    max_diffs,
    probe,
    random_batch,
    random_params,
    torch_outputs,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("jax", "jaxlib", "flax", "ml_collections", "optax", "orbax")

# Run in the child: make the JAX stack unimportable, then load, run and report. `probe` (the
# comparison of tests/test_torch_mpma.py, plain method calls) is pasted in from its source.
CHILD = textwrap.dedent("""
    import json, sys

    BLOCKED = {blocked!r}

    class _Blocked:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ImportError(f"{{name}} is blocked in this test")
        return None

    sys.meta_path.insert(0, _Blocked())
    for name in BLOCKED:
      try:
        __import__(name)
      except ImportError:
        pass
      else:
        raise SystemExit(f"{{name}} is still importable")

    import numpy as np
    import torch
    from mpma_jax.interop.torch_mpma import MPMATorch

    {probe}

    model = MPMATorch.from_pretrained(sys.argv[1])
    batch = {{k: torch.as_tensor(v) for k, v in np.load(sys.argv[2]).items()}}
    with torch.no_grad():
      out = probe(model, batch)
    np.savez(sys.argv[3], **{{k: v.numpy() for k, v in out.items()}})
    print(json.dumps({{"training": model.training,
                      "modules": sorted({{m.split(".")[0] for m in sys.modules}})}}))
""")


def run_without_jax(*args: str) -> dict:
  code = CHILD.format(blocked=BLOCKED, probe=inspect.getsource(probe))
  env = dict(os.environ,
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_from_pretrained_without_jax_matches_the_jax_model(tmp_path):
  case = "pre_fusion-masked-bert-mim1"  # memory, fusion, MIM decoder (sin-cos), every head
  config = make_config(CASES[case])
  model, params = random_params(config, 11)
  batch = random_batch(config, 11)
  exported = tmp_path / "exported" / "mpma"
  torch_mpma.save_pretrained(params, config.model, str(exported))
  np.savez(tmp_path / "batch.npz", **batch)

  child = run_without_jax(str(exported), str(tmp_path / "batch.npz"), str(tmp_path / "out.npz"))
  assert not set(BLOCKED) & set(child["modules"]), child["modules"]
  assert "jax" not in child["modules"] and "torch" in child["modules"]
  assert child["training"] is False
  with np.load(tmp_path / "out.npz") as fh:
    got = dict(fh)

  # The same export loaded here, and the JAX model on the same parameters.
  here = torch_outputs(torch_mpma.MPMATorch.from_pretrained(str(exported)), batch)
  jax_out = jax.jit(lambda p, b: model.apply({"params": p}, b, method=probe))(params, batch)
  jax_out = {k: np.asarray(v) for k, v in jax_out.items()}
  same = max_diffs(here, got)
  assert max(same.values()) <= 1e-6, same
  diffs = max_diffs(jax_out, got)
  assert max(diffs.values()) <= TOL, {k: v for k, v in diffs.items() if v > TOL}
  assert np.abs(got["forward/mlm_logits"]).max() > 0.1  # the outputs carry signal


def test_shared_constants_are_the_jax_models():
  assert vit.CLIP_MEAN is constants.CLIP_MEAN and vit.CLIP_STD is constants.CLIP_STD
  assert decoders.sincos_2d is constants.sincos_2d
  assert (constants.TEXT, constants.IMAGE) == (mpma.TEXT, mpma.IMAGE)
  assert torch_mpma.CLIP_MEAN is constants.CLIP_MEAN
  pos = constants.sincos_2d(4, 32)
  assert pos.shape == (17, 32) and pos.dtype == np.float32 and not pos[0].any()
  np.testing.assert_allclose(
      pos[1 + 4 + 1],
      np.concatenate(  # patch (y=1, x=1)
          [np.sin(1.0 / 10000**(np.arange(8) / 8)),
           np.cos(1.0 / 10000**(np.arange(8) / 8))] * 2),
      rtol=1e-6)


def test_flatten_matches_flax():
  tree = {"a": {"b": np.zeros(2), "c": {"d": np.ones(3)}, "empty": {}}, "e": np.float32(1.0)}
  want = {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
  for source in (tree, flax.core.freeze(tree)):
    got = constants.flatten(source)
    assert list(got) == list(want) == ["a/b", "a/c/d", "e"]
    assert all(got[k] is want[k] for k in want)
  nested = constants.unflatten(want)
  assert nested == traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in want.items()})
  assert type(nested["a"]["c"]) is dict  # pylint: disable=unidiomatic-typecheck
