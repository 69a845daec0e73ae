"""PyTorch MPMA (interop/torch_mpma.py): equal to the JAX model, exact parameter round trips,
safetensors export."""
import json
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors import safe_open
import torch

from mpma_jax import masking, train
from mpma_jax.data import pipeline
from mpma_jax.interop import torch_mpma
from mpma_jax.interop.common import flatten, unflatten
from mpma_jax.models.mpma import MPMA
from tests.conftest import tiny_config

TOL = 1e-4
BATCH, MASK_ID = 3, 4

# Each case overrides tiny_config().model; together they cover every option the port mirrors.
CASES = {
    "pre_fusion-masked-bert-mim1": dict(
        memory=dict(enabled=True, placement="pre_fusion", impl="masked"),
        text=dict(position_style="bert", pad_id=0), mim=dict(layer=1)),
    "every_layer-gather-roberta-mim2": dict(
        memory=dict(enabled=True, placement="every_text_layer", impl="gather"),
        text=dict(position_style="roberta", pad_id=1, dropout=0.1,
                  attn_dropout=0.1), fusion=dict(dropout=0.1, attn_dropout=0.1), mim=dict(layer=2)),
    "every_layer-masked-roberta-mim1": dict(
        memory=dict(enabled=True, placement="every_text_layer", impl="masked"),
        text=dict(position_style="roberta", pad_id=1), mim=dict(layer=1, activation="quick_gelu",
                                                                eps=1e-5)),  # M3AE's decoder blocks
    "no_memory-bert-mim2-masked_gla": dict(memory=dict(enabled=False),
                                           text=dict(position_style="bert", pad_id=0),
                                           mim=dict(layer=2), gla=dict(features_from="masked")),
}


def make_config(overrides: dict):
  config = tiny_config()
  for section, values in overrides.items():
    config.model[section].update(values)
  return config


def random_params(config, seed: int):
  """The JAX tree of the whole model (shapes from init_params), filled from a seeded generator:
  every weight, bias and LayerNorm scale/bias random (no zero or unit tensors left), the local
  temperature below temperature_min so that the clamp is exercised."""
  model = MPMA.from_config(config)
  shapes = jax.eval_shape(lambda k: nn.meta.unbox(train.init_params(config, model, k)),
                          jax.random.key(0))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, s in flatten(shapes).items():
    value = rng.normal(0.0, 0.1, s.shape)
    if path.endswith("scale"):
      value += 1.0  # LayerNorm scales around 1
    flat[path] = value.astype(np.float32)
  flat["gla/log_temperature_global"] = np.float32(math.log(0.05))
  flat["gla/log_temperature_local"] = np.float32(math.log(0.5 * config.model.gla.temperature_min))
  return model, jax.tree.map(np.asarray, unflatten(flat))


def random_batch(config, seed: int) -> dict:
  """uint8 images, texts padded at the end (pad_id), MLM-masked copies, MAE keep/restore."""
  m = config.model
  rng = np.random.default_rng(seed)
  length, n = config.data.max_len, (m.image.size // m.image.patch)**2
  batch = pipeline.dummy_batch(config, BATCH)
  batch["image"] = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
  lengths = [length, length // 2, 3]
  mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int32)  # [B, L]
  ids = rng.integers(MASK_ID + 1, m.text.vocab_size, (BATCH, length)).astype(np.int32)
  batch["text_ids"] = np.where(mask == 1, ids, m.text.pad_id).astype(np.int32)
  mlm = rng.random((BATCH, length)) < 0.3
  batch["mlm_ids"] = np.where(mlm & (mask == 1), MASK_ID, batch["text_ids"]).astype(np.int32)
  batch["text_mask"] = mask
  for b in range(BATCH):
    keep, restore = masking.image_mask(rng, n, config.masking.image_ratio)
    batch["image_keep"][b], batch["image_restore"][b] = keep, restore
  return batch


def probe(m, batch):
  """Every compared output of one model (JAX MPMA or MPMATorch) on one batch."""
  full = m.embed_image(batch["image"])
  image = m.embed_image(batch["image"], batch["image_keep"])
  text = m.embed_text(batch["mlm_ids"], batch["text_mask"])
  clean_text = m.embed_text(batch["text_ids"], batch["text_mask"])
  image_gla, text_gla = m.align(full, clean_text)
  fused = m.fuse(image, text, batch["text_mask"])
  out = {
      "embed_image": full, "embed_image_keep": image, "embed_text": text, "align_image": image_gla,
      "align_text": text_gla, "fused_text": fused["text"], "fused_image": fused["image"],
      "image_at_mim_layer": fused["image_at_mim_layer"], "joint_feature": m.joint_feature(fused),
      "itm_logits": m.itm_logits(full, clean_text, batch["text_mask"])
  }
  out.update({f"forward/{k}": v for k, v in m(batch).items()})
  return out


def torch_model(config, params) -> torch_mpma.MPMATorch:
  return torch_mpma.MPMATorch.from_params(params, config.model)


def torch_outputs(model, batch) -> dict:
  with torch.no_grad():
    out = probe(model, {k: torch.as_tensor(v) for k, v in batch.items()})
  return {k: v.numpy() for k, v in out.items()}


def max_diffs(a: dict, b: dict) -> dict:
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.shape(a[k]) == np.shape(b[k]), (k, np.shape(a[k]), np.shape(b[k]))
  return {k: float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a}


# the first case in the fast tier, every case in the slow one
FIRST_FAST = [c if i == 0 else pytest.param(c, marks=pytest.mark.slow) for i, c in enumerate(CASES)]


@pytest.mark.parametrize("case", FIRST_FAST)
def test_torch_equals_jax(case):
  seed = list(CASES).index(case)
  config = make_config(CASES[case])
  model, params = random_params(config, seed)
  batch = random_batch(config, seed)
  jax_out = jax.jit(lambda p, b: model.apply({"params": p}, b, method=probe))(params, batch)
  jax_out = {k: np.asarray(v) for k, v in jax_out.items()}
  diffs = max_diffs(jax_out, torch_outputs(torch_model(config, params), batch))
  print(case, " ".join(f"{k}={v:.1e}" for k, v in diffs.items()))
  assert max(diffs.values()) <= TOL, {k: v for k, v in diffs.items() if v > TOL}
  # The clamp is active for the local temperature; and the outputs carry signal.
  assert jax_out["forward/temperature_local"] == np.float32(config.model.gla.temperature_min)
  assert np.abs(jax_out["forward/mlm_logits"]).max() > 0.1


@pytest.mark.parametrize("case", ["pre_fusion-masked-bert-mim1", "no_memory-bert-mim2-masked_gla"])
def test_state_dict_round_trip_is_bitwise(case):
  config = make_config(CASES[case])
  _, params = random_params(config, 7)
  state = torch_mpma.state_dict_from_params(params, config.model)
  module_state = torch_mpma.MPMATorch(config.model).state_dict()
  assert sorted(state) == sorted(module_state)  # 1:1, nothing missing or extra
  back = flatten(torch_mpma.params_from_state_dict(state, config.model))
  flat = flatten(params)
  assert sorted(back) == sorted(flat)
  for path, value in flat.items():
    assert back[path].dtype == np.float32 and back[path].shape == value.shape, path
    assert np.array_equal(back[path], value), path
  # Layouts spelled out for one tensor of each kind.
  t = config.model.text
  q = flat["text_encoder/layer_0/attn/query/kernel"]  # [D, H, Dh]
  assert torch.equal(state["text_encoder.layer_0.attn.query.weight"],
                     torch.from_numpy(q.reshape(t.width, -1).T.copy()))
  out = flat["fusion/text_layer_1/cross_attn/out/kernel"]  # [H, Dh, D]
  assert torch.equal(state["fusion.text_layer_1.cross_attn.out.weight"],
                     torch.from_numpy(out.reshape(-1, out.shape[-1]).T.copy()))
  conv = flat["image_encoder/patch_embed/kernel"]  # [p, p, 3, D]
  assert torch.equal(state["image_encoder.patch_embed.weight"],
                     torch.from_numpy(conv.transpose(3, 2, 0, 1).copy()))
  assert torch.equal(state["mlm_head.ln.weight"], torch.from_numpy(flat["mlm_head/ln/scale"]))
  assert torch.equal(state["modality_type.weight"],
                     torch.from_numpy(flat["modality_type/embedding"]))
  assert state["gla.log_temperature_local"].shape == ()


def test_mismatched_tensors_raise():
  config = make_config(CASES["pre_fusion-masked-bert-mim1"])
  _, params = random_params(config, 3)
  state = torch_mpma.state_dict_from_params(params, config.model)
  bad = dict(state, **{"fusion.text_layer_0.mlp.fc1.weight": torch.zeros(3, 4)})
  with pytest.raises(ValueError, match=r"fusion\.text_layer_0\.mlp\.fc1\.weight.*\(3, 4\).*"
                     r"\(128, 64\)"):
    torch_mpma.params_from_state_dict(bad, config.model)
  with pytest.raises(ValueError, match=r"fusion\.text_layer_0\.mlp\.fc1\.weight"):
    torch_mpma.MPMATorch(config.model).load_checked(bad)
  missing = {k: v for k, v in state.items() if k != "memory.memory"}
  with pytest.raises(ValueError, match=r"missing \['memory\.memory'\]"):
    torch_mpma.params_from_state_dict(missing, config.model)
  with pytest.raises(ValueError, match=r"unexpected \['extra\.weight'\]"):
    torch_mpma.params_from_state_dict(dict(state, **{"extra.weight": torch.zeros(1)}), config.model)
  # On the JAX side: a wrong shape names the JAX path; an unknown parameter is refused.
  flat = flatten(params)
  flat["text_proj/kernel"] = np.zeros((5, 6), np.float32)
  with pytest.raises(ValueError, match=r"'text_proj/kernel'.*\(6, 5\).*\(64, 64\)"):
    torch_mpma.state_dict_from_params(unflatten(flat), config.model)
  flat = dict(flatten(params), **{"text_proj/gamma": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match="text_proj/gamma"):
    torch_mpma.state_dict_from_params(unflatten(flat))


def test_save_pretrained_round_trip(tmp_path):
  config = make_config(CASES["every_layer-gather-roberta-mim2"])
  _, params = random_params(config, 5)
  torch_mpma.save_pretrained(params, config.model, str(tmp_path))
  weights = tmp_path / "model.safetensors"
  with open(weights, "rb") as fh:  # safetensors: u64 header length, then a JSON header
    n = int.from_bytes(fh.read(8), "little")
    header = json.loads(fh.read(n))
  assert header["text_encoder.word_embeddings.weight"]["dtype"] == "F32"
  with safe_open(str(weights), "pt") as fh:
    assert sorted(fh.keys()) == sorted(torch_mpma.MPMATorch(config.model).state_dict())
  assert json.loads((tmp_path / "config.json").read_text()) == config.model.to_dict()

  loaded = torch_mpma.MPMATorch.from_pretrained(str(tmp_path))
  assert not loaded.training
  batch = random_batch(config, 5)
  want, got = torch_outputs(torch_model(config, params), batch), torch_outputs(loaded, batch)
  assert all(np.array_equal(want[k], got[k]) for k in want)
  back = flatten(torch_mpma.params_from_state_dict(loaded.state_dict(), config.model))
  assert all(np.array_equal(back[k], v) for k, v in flatten(params).items())


def test_dropout_follows_train_mode():
  config = make_config(CASES["every_layer-gather-roberta-mim2"])  # dropout 0.1 everywhere
  _, params = random_params(config, 2)
  model = torch_model(config, params)
  batch = {k: torch.as_tensor(v) for k, v in random_batch(config, 2).items()}
  with torch.no_grad():
    eval_out = model(batch)["mlm_logits"]
    assert torch.equal(eval_out, model(batch)["mlm_logits"])  # eval: deterministic
    torch.manual_seed(0)
    train_out = model.train()(batch)["mlm_logits"]
  assert not torch.allclose(eval_out, train_out)
  # The image path has no dropout (as in the JAX ViT): equal in both modes.
  with torch.no_grad():
    assert torch.equal(model.train().embed_image(batch["image"]),
                       model.eval().embed_image(batch["image"]))
