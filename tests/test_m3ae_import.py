"""M3AE checkpoint import / export (mpma_jax/interop/m3ae.py): exact round trip, agreement with
independent PyTorch implementations (transformers' RoBERTa and CLIP vision tower), errors, and the
position-embedding resize. Parameters are random arrays in the shapes of a tiny model's tree."""
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from mpma_jax import train
from mpma_jax.interop import common, m3ae, pretrained
from mpma_jax.models.mpma import MPMA
from mpma_jax.models.vit import resize_pos_embed
from tests.conftest import tiny_config

# M3AE-only tensors (fine-tuning head, RoBERTa's own pooler, CLIP text-tower leftovers, a buffer).
EXTRA = {
    "vqa_head.0.weight": (128, 128),
    "vqa_head.0.bias": (128,),
    "vqa_head.1.weight": (128,),
    "vqa_head.1.bias": (128,),
    "vqa_head.3.weight": (7, 128),
    "vqa_head.3.bias": (7,),
    "language_encoder.pooler.dense.weight": (64, 64),
    "language_encoder.pooler.dense.bias": (64,),
    "vision_encoder.token_embedding.weight": (100, 64),
    "vision_encoder.positional_embedding": (16, 64),
    "vision_encoder.ln_final.weight": (64,),
    "vision_encoder.ln_final.bias": (64,),
}
OWN = ("memory/", "gla/")  # MPMA-only subtrees


def _config(**image):
  c = tiny_config()
  m = c.model
  m.text.update(position_style="roberta", pad_id=1, type_vocab_size=1, eps=1e-5)
  m.image.update(heads=1, **image)  # M3AE's CLIP ViT has width // 64 heads
  return c


def _random_params(c, seed):
  """Random float32 arrays (biases and LayerNorm parameters too) shaped like the model's tree."""
  model = MPMA.from_config(c)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(train.init_params(c, model, jax.random.key(0))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _extra(seed=7):
  rng = np.random.default_rng(seed)
  out = {k: rng.standard_normal(s).astype(np.float32) for k, s in EXTRA.items()}
  out["language_encoder.embeddings.position_ids"] = np.arange(64)[None]  # int64 buffer
  return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """(config, params A, path of A in M3AE's Lightning format, the saved state dict)."""
  c = _config()
  params = _random_params(c, seed=1)
  state = m3ae.export_m3ae_state_dict(params, c.model)
  saved = {**state, **_extra()}
  path = str(tmp_path_factory.mktemp("m3ae") / "m3ae.ckpt")
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in saved.items()}, "epoch": 3}, path)
  return c, params, path, saved


def test_round_trip_is_exact(ckpt):
  c, a, path, saved = ckpt
  b = _random_params(c, seed=2)
  out, report = m3ae.import_m3ae(path, b, c.model, require_heads=True)
  flat_a, flat_b, flat_out = common.flatten(a), common.flatten(b), common.flatten(out)
  assert flat_out.keys() == flat_a.keys()
  own = {p for p in flat_a if p.startswith(OWN)}
  assert own and set(report.initialised) == own
  assert set(report.imported) == set(flat_a) - own
  for p, v in flat_out.items():
    np.testing.assert_array_equal(v, (flat_b if p in own else flat_a)[p], err_msg=p)
  assert set(report.skipped) == set(_extra()) | {m3ae.DECODER_POS}
  assert any(m3ae.DECODER_POS in n and "matches" in n for n in report.notes)
  again = m3ae.export_m3ae_state_dict(out, c.model)
  assert again.keys() == saved.keys() - _extra().keys()
  for k, v in again.items():
    np.testing.assert_array_equal(v, saved[k], err_msg=k)
  assert "note" in report.summary()


def test_text_encoder_matches_transformers_roberta(ckpt):
  c, a, path, saved = ckpt
  params, _ = m3ae.import_m3ae(path, a, c.model)
  t = c.model.text
  config = transformers.RobertaConfig(vocab_size=t.vocab_size, hidden_size=t.width,
                                      num_hidden_layers=t.layers, num_attention_heads=t.heads,
                                      intermediate_size=t.mlp_dim,
                                      max_position_embeddings=t.max_positions,
                                      type_vocab_size=t.type_vocab_size, pad_token_id=t.pad_id,
                                      layer_norm_eps=t.eps, hidden_act="gelu")
  roberta = transformers.RobertaModel(config, add_pooling_layer=False).eval()
  prefix = "language_encoder."
  roberta.load_state_dict(
      {
          k[len(prefix):]: torch.from_numpy(v) for k, v in saved.items()
          if k.startswith(prefix) and k not in EXTRA and "position_ids" not in k
      }, strict=True)
  rng = np.random.default_rng(3)
  ids = rng.integers(3, t.vocab_size, (2, 12))
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  ids[1, 8:] = t.pad_id
  with torch.no_grad():
    want = roberta(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  model = MPMA.from_config(c)
  got = model.apply({"params": params}, ids, mask, method=lambda m, i, k: m.text_encoder(i, k))
  diff = np.max(np.abs(np.asarray(got) - want.last_hidden_state.numpy()))
  print(f"text encoder vs RobertaModel: max |diff| = {diff:.2e}")
  assert diff <= 1e-4


def _clip_names(saved, layers, prefix):
  """M3AE's OpenAI-CLIP vision tensors renamed for transformers' CLIPVisionModel (whose names
  carry `prefix`: 'vision_model.' in transformers 4, '' in 5)."""
  v, out = m3ae.VISUAL, {}
  plain = {
      "conv1.weight": "embeddings.patch_embedding.weight",
      "class_embedding": "embeddings.class_embedding",
      "positional_embedding": "embeddings.position_embedding.weight"
  }
  for ours, hf in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    plain.update({f"{ours}.weight": f"{hf}.weight", f"{ours}.bias": f"{hf}.bias"})
  for i in range(layers):
    src, dst = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
    for ours, hf in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                     ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
      for p in ("weight", "bias"):
        plain[f"{src}.{ours}.{p}"] = f"{dst}.{hf}.{p}"
    for p in ("weight", "bias"):
      q, k, val = np.split(saved[f"{v}{src}.attn.in_proj_{p}"], 3, axis=0)
      out.update(
          {f"{prefix}{dst}.self_attn.{n}_proj.{p}": x for n, x in (("q", q), ("k", k), ("v", val))})
  out.update({f"{prefix}{hf}": saved[v + ours] for ours, hf in plain.items()})
  return {k: torch.from_numpy(np.ascontiguousarray(x)) for k, x in out.items()}


def test_image_encoder_matches_transformers_clip(ckpt):
  c, a, path, saved = ckpt
  params, _ = m3ae.import_m3ae(path, a, c.model)
  i = c.model.image
  config = transformers.CLIPVisionConfig(hidden_size=i.width,
                                         intermediate_size=int(i.width * i.mlp_ratio),
                                         num_hidden_layers=i.layers, num_attention_heads=i.heads,
                                         image_size=i.size, patch_size=i.patch,
                                         hidden_act="quick_gelu", layer_norm_eps=1e-5)
  clip = transformers.CLIPVisionModel(config).eval()
  tower = getattr(clip, "vision_model", clip)
  prefix = "vision_model." if tower is not clip else ""
  clip.load_state_dict(_clip_names(saved, i.layers, prefix), strict=True)
  images = np.random.default_rng(4).standard_normal((2, i.size, i.size, 3)).astype(np.float32)
  with torch.no_grad():
    hidden = clip(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state
    want = tower.post_layernorm(hidden).numpy()
  model = MPMA.from_config(c)
  got = model.apply({"params": params}, images, method=lambda m, x: m.image_encoder(x))
  diff = np.max(np.abs(np.asarray(got) - want))
  print(f"image encoder vs CLIPVisionModel: max |diff| = {diff:.2e}")
  assert diff <= 1e-4


def test_wrong_shape_and_missing_tensor_raise(ckpt):
  c, a, _, saved = ckpt
  key = "multi_modal_language_layers.0.attention.output.dense.weight"
  bad = {**saved, key: np.zeros((64, 60), np.float32)}
  with pytest.raises(ValueError, match=rf"{key}.*\(64, 60\).*\(64, 64\)"):
    m3ae.import_m3ae_state_dict(bad, a, c.model)
  key = "multi_modal_vision_layers.1.output.LayerNorm.bias"
  missing = {k: v for k, v in saved.items() if k != key}
  with pytest.raises(KeyError, match=key):
    m3ae.import_m3ae_state_dict(missing, a, c.model)
  with pytest.raises(ValueError, match="vision_encoder.visual.proj"):
    m3ae.import_m3ae_state_dict({**saved, "vision_encoder.visual.proj": np.zeros((64, 32))}, a,
                                c.model)


@pytest.mark.parametrize("field,value", [("fusion.layers", 3), ("image.layers", 3),
                                         ("text.position_style", "bert"), ("text.pad_id", 0),
                                         ("image.heads", 2)])
def test_incompatible_config_raises_naming_the_field(ckpt, field, value):
  c, a, _, saved = ckpt
  other = _config()
  section, name = field.split(".")
  other.model[section][name] = value
  with pytest.raises(ValueError, match=rf"model\.{field} = .* but it is {value!r}"):
    m3ae.import_m3ae_state_dict(saved, a, other.model)


def test_checkpoint_without_heads_keeps_them_fresh(ckpt):
  c, a, _, saved = ckpt
  b = _random_params(c, seed=5)
  bare = {k: v for k, v in saved.items() if not k.startswith(m3ae.HEADS)}
  with pytest.raises(KeyError, match="require_heads"):
    m3ae.import_m3ae_state_dict(bare, b, c.model, require_heads=True)
  out, report = m3ae.import_m3ae_state_dict(bare, b, c.model)
  fresh = {
      p for p in common.flatten(b) if p.startswith(OWN + ("mlm_head/", "mim_decoder/", "itm_head/"))
  }
  assert set(report.initialised) == fresh
  flat_out, flat_b = common.flatten(out), common.flatten(b)
  for p in fresh:
    np.testing.assert_array_equal(flat_out[p], flat_b[p], err_msg=p)
  assert sum("has no" in n for n in report.notes) == 3


def test_position_embedding_is_resized(ckpt):
  c, a, path, _ = ckpt
  big = _config(size=48)  # checkpoint grid 4x4 -> 6x6
  b = _random_params(big, seed=6)
  out, report = m3ae.import_m3ae(path, b, big.model)
  pos_a = common.flatten(a)["image_encoder/position_embedding"]  # [17, D]
  pos = common.flatten(out)["image_encoder/position_embedding"]  # [37, D]
  assert pos.shape == (37, big.model.image.width)
  np.testing.assert_array_equal(pos[0], pos_a[0])
  np.testing.assert_array_equal(pos, np.asarray(resize_pos_embed(pos_a, 6)))
  assert any("4x4" in n and "6x6" in n for n in report.notes)
  np.testing.assert_array_equal(
      common.flatten(out)["image_encoder/patch_embed/kernel"],
      common.flatten(a)["image_encoder/patch_embed/kernel"])


def test_full_lightning_checkpoint_loads(tmp_path, monkeypatch):
  """PL 1.x pickles callback classes (dict keys) and may store an AttributeDict beside the
  weights; load_state_dict reads them as stand-ins, where plain weights_only loading refuses."""
  classes = {
      "pytorch_lightning.callbacks.model_checkpoint": ("ModelCheckpoint", object),
      "pytorch_lightning.utilities.parsing": ("AttributeDict", dict)
  }
  made = {}
  with monkeypatch.context() as mp:
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks",
                   "pytorch_lightning.utilities"):  # pickle imports the packages above a class
      mp.setitem(sys.modules, parent, types.ModuleType(parent))
    for module, (name, base) in classes.items():
      mod = types.ModuleType(module)
      made[name] = type(name, (base,), {"__module__": module})
      setattr(mod, name, made[name])
      mp.setitem(sys.modules, module, mod)
    path = str(tmp_path / "full.ckpt")
    torch.save(
        {
            "state_dict": {"w": torch.ones(2, 3)}, "epoch": 1, "callbacks": {
                made["ModelCheckpoint"]:
                    {"best_model_score": torch.tensor(0.5), "dirpath": "ckpts"}
            }, "hyper_parameters": made["AttributeDict"](config={"mim_layer": 3})
        }, path)
  assert "pytorch_lightning" not in sys.modules
  with pytest.raises(Exception, match="ModelCheckpoint|AttributeDict"):
    torch.load(path, weights_only=True)
  state = common.load_state_dict(path)
  assert list(state) == ["w"]
  np.testing.assert_array_equal(state["w"], np.ones((2, 3), np.float32))


def test_adapt_config_takes_the_sizes_from_the_checkpoint(ckpt):
  """`init.m3ae` with init.adapt_config: the model is sized from the checkpoint's tensors, and the
  import then succeeds."""
  c, params, path, _ = ckpt
  other = tiny_config()
  other.init.m3ae = path
  other.model.image.update(layers=3, heads=4, mlp_ratio=2.0)
  other.model.text.update(layers=1, mlp_dim=64)
  other.model.fusion.update(layers=1)
  other.model.mlm.eps = 1e-5
  changes = pretrained.adapt_config(other)
  for section in ("image", "text", "fusion"):
    for field, value in c.model[section].items():
      if field in ("layers", "heads", "mlp_ratio", "mlp_dim", "position_style", "pad_id", "width",
                   "patch"):
        assert other.model[section][field] == value, (section, field, changes)
  assert (other.model.mim.activation, other.model.mim.eps) == ("quick_gelu", 1e-5)  # CLIP blocks
  assert other.model.mlm.eps == 1e-12  # M3AE's MLM head is BERT's
  fresh = _random_params(other, seed=2)
  imported, _ = pretrained.initialise(other, fresh)
  np.testing.assert_array_equal(imported["fusion"]["text_layer_0"]["mlp"]["fc1"]["kernel"],
                                params["fusion"]["text_layer_0"]["mlp"]["fc1"]["kernel"])
