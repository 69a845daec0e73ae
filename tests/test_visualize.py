"""Pictures (mpma_jax/visualize.py): each picture's numbers against the model and the training
loss, the PNGs, the TensorBoard images, and `mpma-visualize` on a real run directory."""
import json
import os
import shutil
import struct

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from mpma_jax import losses, masking, retrieval, train, visualize
from mpma_jax.data import pipeline
from mpma_jax.data import tokenizer as tokenizers
from mpma_jax.models.mpma import MPMA
from mpma_jax.models.vit import normalize_images
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
  config = tiny_config()
  params = nn.meta.unbox(train.init_params(config, MPMA.from_config(config), jax.random.key(0)))
  return config, jax.device_get(params)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
  return tokenizers.load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def pairs(model, tok, data_dir):
  return pipeline.eval_pairs(model[0], tok, 12, data_dir)


def _patches(images, patch):
  return np.asarray(losses.patchify(np.asarray(images), patch))  # [B, N, p*p*3]


def _apply(config, params, *args, method=None):
  model = MPMA.from_config(config)
  return jax.device_get(
      jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method))(params, *args))


def _size(rgb, width_in, height_in):
  """The picture is (height_in x width_in) inches at 100 dpi (+-1 pixel of rounding)."""
  assert abs(rgb.shape[0] - 100 * height_in) <= 1 and abs(rgb.shape[1] - 100 * width_in) <= 1, (
      rgb.shape, width_in, height_in)


def _decode_png(path):
  return np.asarray(Image.open(path).convert("RGB"))


# --- MIM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix", [True, False])
def test_mim_panels_show_the_original_where_visible_and_the_prediction_where_masked(
    model, pairs, norm_pix):
  config, params = model
  config = tiny_config()
  config.model.mim.norm_pix = norm_pix
  images, ids, mask = pairs["image"][:3], pairs["text_ids"][:3], pairs["text_mask"][:3]
  panels = visualize.mim_panels(config.model, params, images, ids, mask, seed=5, mask_ratio=0.75)

  p, n = config.model.image.patch, 16
  drawn = [masking.image_mask(masking.example_rng(5, 0, i), n, 0.75) for i in range(3)]
  keep, restore = np.stack([k for k, _ in drawn]), np.stack([r for _, r in drawn])
  masked = restore >= 4
  np.testing.assert_array_equal(panels["masked"], masked)
  assert masked.sum() == 3 * 12

  batch = {
      "image": images, "image_keep": keep, "image_restore": restore, "text_ids": ids,
      "mlm_ids": ids, "text_mask": mask
  }
  mim_pred = _apply(config, params, batch)["mim_pred"]  # [B, N, p*p*3]
  pred, target = mim_pred, _patches(normalize_images(images), p)
  if norm_pix:
    pred = pred * np.sqrt(target.var(-1, keepdims=True) + 1e-6) + target.mean(-1, keepdims=True)
  from mpma_jax.models.vit import CLIP_MEAN, CLIP_STD  # pylint: disable=g-import-not-at-top
  want = _patches(
      np.clip(np.rint((np.asarray(losses.unpatchify(pred, p)) * CLIP_STD + CLIP_MEAN) * 255), 0,
              255), p)

  original = _patches(images, p)
  rec, shown = _patches(panels["reconstruction"], p), _patches(panels["masked_input"], p)
  np.testing.assert_array_equal(rec[~masked], original[~masked])  # visible: exactly the original
  np.testing.assert_allclose(rec[masked], want[masked], atol=1)  # masked: predicted (+-rounding)
  np.testing.assert_allclose(_patches(panels["prediction"], p), want, atol=1)
  np.testing.assert_array_equal(shown[~masked], original[~masked])
  # masked patches blanked exactly
  np.testing.assert_array_equal(shown[masked].reshape(-1, 3) - visualize._MASK_FILL, 0)
  np.testing.assert_array_equal(panels["original"], images)
  # Each image's MIM loss is the training loss on that image alone.
  for i in range(3):
    loss = losses.mim_loss(mim_pred[i:i + 1], normalize_images(images[i:i + 1]), restore[i:i + 1],
                           4, p, norm_pix)
    assert panels["mim_loss"][i] == pytest.approx(float(loss), rel=1e-4)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_a_perfect_prediction_reconstructs_the_original(model, pairs, monkeypatch, norm_pix):
  """The un-normalisation inverts the training target exactly: feeding the target back as the
  prediction gives the original image in every panel."""
  config = tiny_config()
  config.model.mim.norm_pix = norm_pix
  images = pairs["image"][:2]
  target = _patches(normalize_images(images), 8)
  if norm_pix:
    target = (target -
              target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  monkeypatch.setattr(visualize, "_apply", lambda *a: {"mim_pred": target})
  panels = visualize.mim_panels(config.model, model[1], images, pairs["text_ids"][:2],
                                pairs["text_mask"][:2])
  np.testing.assert_allclose(panels["reconstruction"], images, atol=1)
  np.testing.assert_allclose(panels["prediction"], images, atol=1)
  np.testing.assert_allclose(panels["mim_loss"], 0.0, atol=1e-9)


def test_mim_picture_png(model, pairs, tmp_path):
  config, params = model
  path = str(tmp_path / "sub" / "mim.png")
  rgb = visualize.mim_reconstructions(config.model, params, pairs["image"][:3],
                                      pairs["text_ids"][:3], pairs["text_mask"][:3], path)
  assert rgb.dtype == np.uint8
  _size(rgb, 4 * 1.9 + 0.1, 0.2 + 3 * 2.2 + 0.1)  # norm_pix caption + one row per image
  np.testing.assert_array_equal(_decode_png(path), rgb)  # the PNG is the returned picture
  with pytest.raises(ValueError, match=r"uint8 \[B, 32, 32, 3\]"):
    visualize.mim_panels(config.model, params, pairs["image"][:1, :16], pairs["text_ids"][:1],
                         pairs["text_mask"][:1])


# --- alignment ------------------------------------------------------------------------------------
def test_word_maps_are_the_gla_similarity_over_the_patch_grid(model, pairs):
  config, params = model
  images, ids, mask = pairs["image"][:3], pairs["text_ids"][:3], pairs["text_mask"][:3]
  maps = visualize.word_similarity_maps(config.model, params, images, ids, mask)
  assert maps.shape == (3, config.data.max_len, 4, 4)

  def gla(module, images, ids, mask):
    return module.align(module.embed_image(images), module.embed_text(ids, mask))

  image_gla, text_gla = _apply(config, params, images, ids, mask, method=gla)
  b, l, r, c = 1, 2, 3, 1  # row r, column c of the grid is patch r * 4 + c
  assert maps[b, l, r, c] == pytest.approx(float(text_gla[b, l] @ image_gla[b, 1 + r * 4 + c]),
                                           abs=1e-5)
  want = np.einsum("blg,bpg->blp", text_gla, image_gla[:, 1:]).reshape(maps.shape)
  np.testing.assert_allclose(maps, want, atol=1e-5)
  assert np.all(np.abs(maps) <= 1 + 1e-5)  # cosines


class _BPEStub:
  """The two tokenizer methods `words` uses, RoBERTa-style (Ġ marks a word start)."""
  tokens = ["<s>", "Ġpne", "um", "othorax", "Ġis", ".", "Ġsmall", "</s>", "<pad>"]

  def convert_ids_to_tokens(self, ids):
    return [self.tokens[i] for i in ids]

  def convert_tokens_to_string(self, tokens):
    return "".join(tokens).replace("Ġ", " ")


def test_words_join_sub_word_pieces(tok):
  text = "nodularity in the left lung."
  enc = pipeline.encode_texts(tok, [text], 24)
  ids, word_mask = enc["text_ids"][0], enc["word_mask"][0]
  pieces = tok.convert_ids_to_tokens([int(i) for i in ids])
  assert sum(t.startswith("##") for t in pieces) >= 3  # the tiny vocabulary splits the words
  got = visualize.words(tok, ids, word_mask)
  assert [w for w, _ in got] == ["nodularity", "in", "the", "left", "lung", "."]
  positions = [i for _, pos in got for i in pos]
  assert positions == list(np.flatnonzero(word_mask))  # every real token once, in order
  assert all(pos == list(range(pos[0], pos[-1] + 1)) for _, pos in got)
  stub_words = visualize.words(_BPEStub(), list(range(9)), [0, 1, 1, 1, 1, 1, 1, 0, 0])
  assert stub_words == [("pneumothorax", [1, 2, 3]), ("is", [4]), (".", [5]), ("small", [6])]


def test_word_heatmap_and_word_choice():
  rng = np.random.default_rng(0)
  maps = rng.uniform(-0.5, 0.5, (6, 3, 3))
  maps[4, 1, 1] = 0.9  # "mass" peaks here
  text_words = [("the", [0]), ("nodule", [1, 2]), (".", [3]), ("mass", [4]), ("nodule", [5])]
  np.testing.assert_array_equal(visualize.word_heatmap(maps, [1, 2]), (maps[1] + maps[2]) / 2)
  chosen = visualize.pick_words(maps, text_words, 3)
  assert [w for w, _ in chosen][0] == "mass"  # the highest peak first
  # no function words, no punctuation, no repeats
  assert sorted(w for w, _ in chosen) == ["mass", "nodule"]
  nodule = dict(chosen)["nodule"]
  first, second = (maps[1] + maps[2]) / 2, maps[5]
  np.testing.assert_array_equal(nodule, first if first.max() >= second.max() else second)


def test_alignment_picture_png(model, pairs, tok, tmp_path):
  config, params = model
  path = str(tmp_path / "alignment.png")
  rgb = visualize.alignment_heatmaps(config.model, params, pairs["image"][:2],
                                     pairs["text_ids"][:2], pairs["text_mask"][:2],
                                     pairs["word_mask"][:2], tok, path, words_per_image=3)
  _size(rgb, 2.4 + 4 * 1.9 + 0.1, 2 * 2.2 + 0.1)  # report, image, 3 words
  np.testing.assert_array_equal(_decode_png(path), rgb)


# --- retrieval ------------------------------------------------------------------------------------
def test_retrieval_ranking_is_the_gla_global_similarity_sorted(model, pairs):
  config, params = model
  sim, top = visualize.retrieval_ranking(config.model, params, pairs["image"], pairs["text_ids"],
                                         pairs["text_mask"], k=5)
  image_emb, text_emb = _apply(config, params, pairs["image"], pairs["text_ids"],
                               pairs["text_mask"], method=retrieval._global_embeddings)
  np.testing.assert_allclose(sim, image_emb @ text_emb.T, atol=1e-5)
  assert top.shape == (12, 5)
  np.testing.assert_array_equal(top, np.argsort(-sim, axis=0)[:5].T)
  for q in range(12):  # descending similarity
    assert np.all(np.diff(sim[top[q], q]) <= 0)


def test_top_images_breaks_ties_by_index():
  sim = np.array([[0.1, 0.5], [0.7, 0.5], [0.7, 0.9], [0.2, 0.5]])  # [4 images, 2 texts]
  np.testing.assert_array_equal(visualize.top_images(sim, 3), [[1, 2, 3], [2, 0, 1]])


def test_retrieval_picture_png(model, pairs, tok, tmp_path):
  config, params = model
  path = str(tmp_path / "retrieval.png")
  rgb = visualize.retrieval_examples(config.model, params, pairs, tok, path, num_queries=2, k=5)
  _size(rgb, 2.6 + 5 * 1.9 + 0.1, 2 * 2.05 + 0.1)  # report, 5 images
  np.testing.assert_array_equal(_decode_png(path), rgb)


# --- training curves ------------------------------------------------------------------------------
def _write_metrics(path):
  lines = [
      {"step": 10, "split": "train", "loss": 5.0, "mlm": 3.0, "lr": 1e-4},
      {"step": 20, "split": "train", "loss": 4.0, "mlm": 2.5, "lr": 2e-4},
      {"step": 30, "split": "train", "loss": 3.9, "mlm": 2.4, "lr": 3e-4},
      {"step": 30, "split": "eval", "i2t_r1": 0.5},
      # restarted from the checkpoint at step 20: steps 30.. again, the new values count
      {"step": 30, "split": "train", "loss": 3.5, "mlm": 2.0, "lr": 3e-4, "mim": 0.7},
      {"step": 40, "split": "train", "loss": 3.0, "mlm": 1.5, "lr": 2e-4, "mim": 0.6}
  ]
  with open(path, "w") as f:
    f.write("".join(json.dumps(l) + "\n" for l in lines) + '{"step": 50, "spl')  # cut short


def test_read_curves_keeps_the_last_line_of_a_repeated_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write_metrics(path)
  curves = visualize.read_curves(path)
  assert sorted(curves) == ["loss", "lr", "mim", "mlm"]
  np.testing.assert_array_equal(curves["loss"][0], [10, 20, 30, 40])
  np.testing.assert_array_equal(curves["loss"][1], [5.0, 4.0, 3.5, 3.0])
  np.testing.assert_array_equal(curves["mim"][0], [30, 40])
  assert list(visualize.read_curves(path, "eval")) == ["i2t_r1"]


def test_training_curves_png(tmp_path):
  metrics = str(tmp_path / "metrics.jsonl")
  _write_metrics(metrics)
  rgb = visualize.training_curves(metrics, str(tmp_path / "curves.png"), mark_step=20)
  assert rgb.shape == (240, 4 * 320, 3)  # panels: total loss, MLM, MIM, learning rate
  np.testing.assert_array_equal(_decode_png(str(tmp_path / "curves.png")), rgb)
  with open(metrics, "w") as f:
    f.write(json.dumps({"step": 1, "split": "eval", "i2t_r1": 0.1}) + "\n")
  with pytest.raises(ValueError, match="no train-split metrics"):
    visualize.training_curves(metrics)


# --- TensorBoard ----------------------------------------------------------------------------------
def _tb_images(logdir) -> dict:
  """{(tag, step): uint8 [H, W, 3]} of every image summary in a TensorBoard log directory (read
  with the record framing of TFRecord: u64 length, u32 crc, data, u32 crc)."""
  import io  # pylint: disable=g-import-not-at-top

  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("image"):
          rgb = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)).convert("RGB"))
          assert rgb.shape == (value.image.height, value.image.width, 3)
          out[(value.tag, event.step)] = rgb
  return out


def test_to_tensorboard_writes_image_summaries(tmp_path):
  rng = np.random.default_rng(0)
  pictures = {
      "mim": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
      "curves": rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
  }
  visualize.to_tensorboard(str(tmp_path), pictures, step=7)
  got = _tb_images(str(tmp_path))
  assert sorted(got) == [("pictures/curves", 7), ("pictures/mim", 7)]
  for name, rgb in pictures.items():
    np.testing.assert_array_equal(got[(f"pictures/{name}", 7)], rgb)


# --- a run directory ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pretrained_run, data_dir):
  """A copy of the shared pre-training run (conftest.pretrained_run: checkpoint at step 100),
  without the pictures and TensorBoard images its end-of-run evaluation wrote, and with its
  data_dir named in config.json as mpma-pretrain writes it."""
  workdir = str(tmp_path_factory.mktemp("vis") / "run")
  shutil.copytree(pretrained_run, workdir, ignore=shutil.ignore_patterns("pictures", "tb"))
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.data.data_dir = data_dir
  config.eval.update(num_pairs=16, batch_size=16)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return workdir


@pytest.mark.slow
def test_visualize_run_writes_the_four_pictures_and_tensorboard_images(run_dir):
  paths = visualize.visualize_run(run_dir, num=3, gallery=8)
  names = ["mim", "alignment", "retrieval", "curves"]
  assert paths == [os.path.join(run_dir, "pictures", f"{n}_step100.png") for n in names]
  tb = _tb_images(os.path.join(run_dir, "tb"))
  for name, path in zip(names, paths):
    np.testing.assert_array_equal(tb[(f"pictures/{name}", 100)], _decode_png(path))
  _size(_decode_png(paths[0]), 4 * 1.9 + 0.1, 0.2 + 3 * 2.2 + 0.1)  # one row per example
  _size(_decode_png(paths[2]), 2.6 + 5 * 1.9 + 0.1, 3 * 2.05 + 0.1)
  # A step without a checkpoint names the ones there are.
  with pytest.raises(ValueError, match=r"no checkpoint for step 1 .* \[100\]"):
    visualize.visualize_run(run_dir, step=1)


@pytest.mark.slow
def test_visualize_command_line(run_dir, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user's run would have
  done = subprocess.run([
      sys.executable, "-m", "mpma_jax.cli.visualize", "--workdir", run_dir, "--step", "100",
      "--out",
      str(tmp_path / "cli"), "--num", "2"
  ], capture_output=True, text=True, env=env, check=True)
  paths = json.loads(done.stdout.strip().splitlines()[-1])["paths"]
  assert paths == [
      str(tmp_path / "cli" / f"{n}_step100.png")
      for n in ("mim", "alignment", "retrieval", "curves")
  ]
  assert all(_decode_png(p).shape[0] > 0 for p in paths)
