"""PyTorch -> JAX pre-training -> PyTorch: `init.image` / `init.text` in a real (sharded) run, and
`mpma-export` of its checkpoint, loaded back by transformers and by the PyTorch MPMA module with
the same outputs as the JAX model."""
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from mpma_jax import checkpoint, export, optim, sharding, train
from mpma_jax.data import tokenizer as tokenizers
from mpma_jax.interop import common, hf_clip, hf_text, pretrained
from mpma_jax.interop.torch_mpma import MPMATorch
from mpma_jax.models import mpma
from mpma_jax.models.mpma import MPMA
from mpma_jax.models.vit import normalize_images
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # the slow tier: trains a run to export

TOL = 1e-4


def _hf_dirs(root):
  """Tiny random CLIPVisionModel and BertForMaskedLM directories matching tiny_config()."""
  torch.manual_seed(0)
  clip = transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=256))
  bert = transformers.BertForMaskedLM(
      transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=128,
                              max_position_embeddings=64, type_vocab_size=2, pad_token_id=0))
  dirs = {}
  for name, model in (("clip", clip), ("bert", bert)):
    with torch.no_grad():  # HF's init has zero biases and unit LayerNorms: make every value count
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    dirs[name] = os.path.join(root, name)
    model.save_pretrained(dirs[name])
  return dirs


def _config(dirs):
  config = tiny_config()
  config.init.update(image=dirs["clip"], text=dirs["bert"])
  config.train.update(steps=2, log_every=1, ckpt_every=2)
  config.eval.update(num_pairs=16, batch_size=16)
  return config


def test_adapt_config_takes_sizes_and_tokenizer_from_the_checkpoints(tmp_path):
  dirs = _hf_dirs(str(tmp_path))
  config = _config(dirs)
  config.model.image.update(width=32, layers=3, heads=4, patch=16, mlp_ratio=2.0)
  config.model.text.update(width=32, layers=1, mlp_dim=64, max_positions=128)
  changes = pretrained.adapt_config(config)
  assert (config.model.image.width, config.model.image.layers, config.model.image.heads,
          config.model.image.patch, config.model.image.mlp_ratio) == (64, 2, 2, 8, 4.0)
  assert config.model.image.size == 32  # resolution is the run's choice (positions are resized)
  assert (config.model.text.width, config.model.text.layers, config.model.text.mlp_dim,
          config.model.text.max_positions) == (64, 2, 128, 64)
  assert config.data.tokenizer == dirs["bert"]
  assert any(c.startswith("width 32 -> 64") for c in changes), changes
  config.init.adapt_config = False
  config.model.text.width = 32
  assert pretrained.adapt_config(config) == [] and config.model.text.width == 32


def test_a_shallower_vit_imports_the_first_blocks_and_reports_the_others(tmp_path):
  """model.image.layers = 1 with a 2-block CLIP (M3AE: 11 of 12): adapt_config keeps the depth,
  block 0 is imported, and init_report.txt says that block 1 was not used."""
  dirs = _hf_dirs(str(tmp_path))
  config = _config(dirs)
  config.init.text = ""
  config.model.image.layers = 1
  changes = pretrained.adapt_config(config)
  assert config.model.image.layers == 1
  assert any(c.startswith("layers 1 kept: the first 1 of the 2 blocks") for c in changes), changes
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  model, tx = MPMA.from_config(config), optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fresh, shardings = train.create_train_state(config, model, tx, mesh, rules)
    state = train.load_pretrained(config, fresh, shardings, tx, str(tmp_path))
  clip = common.load_state_dict(dirs["clip"])
  prefix = "vision_model." if "vision_model.encoder.layers.0.mlp.fc1.weight" in clip else ""
  np.testing.assert_array_equal(
      jax.device_get(state.params["image_encoder"]["block_0"]["mlp"]["fc1"]["kernel"]),
      clip[prefix + "encoder.layers.0.mlp.fc1.weight"].T)
  report = open(os.path.join(tmp_path, "init_report.txt")).read()
  assert (f"model.image.layers is 1: blocks 0..0 of the checkpoint's 2 imported, "
          f"{prefix}encoder.layers.1 not used") in report
  assert f"skipped      {prefix}encoder.layers.1.mlp.fc1.weight" in report
  assert f"{prefix}encoder.layers.1" not in "".join(
      line for line in report.splitlines() if line.startswith("  imported"))


@pytest.mark.parametrize("scan", [False, True])
def test_load_pretrained_writes_the_checkpoints_into_the_sharded_state(tmp_path, scan):
  dirs = _hf_dirs(str(tmp_path))
  config = _config(dirs)
  config.model.scan = scan  # stacked blocks: imported through the unrolled layout
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  model, tx = MPMA.from_config(config), optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fresh, shardings = train.create_train_state(config, model, tx, mesh, rules)
    fresh_params = mpma.unrolled_params(jax.device_get(fresh.params), config.model)
    state = train.load_pretrained(config, fresh, shardings, tx, str(tmp_path))
  got = common.flatten(mpma.unrolled_params(jax.device_get(state.params), config.model))
  # what the converters give on host arrays
  want, report_image = hf_clip.import_clip_vision(dirs["clip"], fresh_params, config.model.image)
  want, report_text = hf_text.import_hf_text(dirs["bert"], want, config.model.text)
  want, fresh_flat = common.flatten(want), common.flatten(fresh_params)
  for path, value in got.items():
    np.testing.assert_array_equal(value, want[path], err_msg=path)
    imported = path in report_image.imported or path in report_text.imported
    assert imported == path.startswith(("image_encoder/", "text_encoder/", "mlm_head/")), path
    if not imported:  # memory, GLA, fusion, ... keep their fresh values
      np.testing.assert_array_equal(value, fresh_flat[path], err_msg=path)
  assert len(report_image.imported) + len(report_text.imported) == sum(
      p.startswith(("image_encoder/", "text_encoder/", "mlm_head/")) for p in got)
  # placed in the state's shardings, with a fresh optimizer state for the new values
  for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params)):
    assert x.sharding == s
  mu = jax.device_get(state.opt_state)
  assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(mu) if np.ndim(m) > 0)
  report = open(os.path.join(tmp_path, "init_report.txt")).read()
  assert f"{len(report_image.imported)} parameters imported" in report
  assert f"{len(report_text.imported)} parameters imported" in report
  assert "imported     text_encoder/word_embeddings <- bert.embeddings.word_embeddings.weight" in report


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def exported_run(request, tmp_path_factory, tokenizer_dir, data_dir):
  """2 steps of pre-training from the HF checkpoints, written as mpma-pretrain does, exported
  (with the blocks unrolled, and stacked by model.scan)."""
  root = str(tmp_path_factory.mktemp("flow"))
  dirs = _hf_dirs(root)
  config = _config(dirs)
  config.model.scan = request.param
  workdir = os.path.join(root, "run")
  os.makedirs(workdir)
  shutil.copytree(tokenizer_dir, os.path.join(workdir, "tokenizer"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  train.train_and_evaluate(config, workdir, tok, tokenizer_dir, data_dir)
  out = os.path.join(root, "exported")
  result = export.export(workdir, out)
  params, step = checkpoint.restore_params(workdir)
  return config, workdir, out, result, params, step


def _inputs(config, seed=0):
  rng = np.random.default_rng(seed)
  s, b, length = config.model.image.size, 3, 12
  images = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
  ids = rng.integers(5, config.model.text.vocab_size, (b, length)).astype(np.int32)
  mask = np.ones((b, length), np.int32)
  mask[1, 8:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = config.model.text.pad_id
  return images, ids, mask


def test_export_writes_safetensors_and_json_only(exported_run):
  _, workdir, out, result, _, step = exported_run
  assert result["step"] == step == 2
  assert open(os.path.join(workdir, "init_report.txt")).read().startswith("import from")
  for name in ("image_encoder", "text_encoder", "mpma"):
    files = os.listdir(os.path.join(out, name))
    assert "model.safetensors" in files and "config.json" in files, files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt", ".pkl"))], files
  assert "tokenizer.json" in os.listdir(os.path.join(out, "text_encoder"))


def test_exported_encoders_match_the_trained_jax_model(exported_run):
  config, _, out, _, params, _ = exported_run
  model = MPMA.from_config(config)
  images, ids, mask = _inputs(config)
  vision = transformers.CLIPVisionModel.from_pretrained(os.path.join(out, "image_encoder")).eval()
  text = transformers.BertModel.from_pretrained(os.path.join(out, "text_encoder"),
                                                add_pooling_layer=False).eval()
  jax_image = model.apply({"params": params}, images,
                          method=lambda m, x: m.image_encoder(normalize_images(x)))
  jax_text = model.apply({"params": params}, ids, mask, method=lambda m, i, a: m.text_encoder(i, a))
  pixels = torch.from_numpy(np.asarray(normalize_images(images))).permute(0, 3, 1, 2)
  with torch.no_grad():
    hf_image = vision(pixel_values=pixels).last_hidden_state
    hf_image = vision.post_layernorm(hf_image).numpy()  # (transformers 5: no .vision_model)
    hf_text = text(input_ids=torch.from_numpy(ids).long(),
                   attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  assert np.abs(hf_image - np.asarray(jax_image)).max() <= TOL
  real = mask.astype(bool)
  assert np.abs(hf_text - np.asarray(jax_text))[real].max() <= TOL


def test_exported_mpma_module_matches_the_trained_jax_model(exported_run):
  config, _, out, _, params, _ = exported_run
  model = MPMA.from_config(config)
  images, ids, mask = _inputs(config, seed=1)

  def jax_forward(m, images, ids, mask):
    fused = m.fuse(m.embed_image(images), m.embed_text(ids, mask), mask)
    return m.joint_feature(fused), m.mlm_head(fused["text"])

  joint, logits = model.apply({"params": params}, images, ids, mask, method=jax_forward)
  torch_model = MPMATorch.from_pretrained(os.path.join(out, "mpma")).eval()
  with torch.no_grad():
    t_images, t_ids, t_mask = (torch.from_numpy(images), torch.from_numpy(ids).long(),
                               torch.from_numpy(mask).long())
    fused = torch_model.fuse(torch_model.embed_image(t_images),
                             torch_model.embed_text(t_ids, t_mask), t_mask)
    t_joint = torch_model.joint_feature(fused).numpy()
    t_logits = torch_model.mlm_head(fused["text"]).numpy()
  assert np.abs(t_joint - np.asarray(joint)).max() <= TOL
  assert np.abs(t_logits - np.asarray(logits)).max() <= TOL
  assert json.load(open(os.path.join(out, "mpma", "config.json")))["hidden"] == config.model.hidden


def test_export_command_line(exported_run, tmp_path):
  """`mpma-export` (as `python -m mpma_jax.export`): the given step, one JSON line, clear errors."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  _, workdir, _, _, _, _ = exported_run
  cmd = [sys.executable, "-m", "mpma_jax.cli.export", "--workdir", workdir]
  done = subprocess.run(cmd + ["--out", str(tmp_path / "e"), "--step", "2"], capture_output=True,
                        text=True, check=True)
  assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2
  assert sorted(os.listdir(tmp_path / "e")) == ["image_encoder", "mpma", "text_encoder"]
  bad = subprocess.run(cmd + ["--out", str(tmp_path / "f"), "--step", "7"], capture_output=True,
                       text=True)
  assert bad.returncode != 0 and "no checkpoint for step 7" in bad.stderr
