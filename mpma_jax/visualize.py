"""Pictures of a pre-trained model: what MIM reconstructs, where a word looks in the
image, which images a report retrieves, and how training went.

  mim_reconstructions  original / masked input / reconstruction / prediction, one row per image
  alignment_heatmaps   a word's GLA similarity over the image patches, overlaid on the image
  retrieval_examples   a report as query and its top-k images by GLA global similarity
  training_curves      loss components, accuracies, temperatures, learning rate... vs step

Each picture's numbers come from a pure array function (`mim_panels`, `word_similarity_maps` +
`words` + `word_heatmap`, `retrieval_ranking`, `read_curves`), tested against the model. The
drawing uses matplotlib's Agg canvas directly (no pyplot, so no global figure state); each picture
function writes a PNG when given a path and returns the picture as uint8 [H, W, 3], the very array
that `to_tensorboard` logs under `pictures/<name>`.

`mpma-visualize --workdir RUN [--step N] [--out DIR] [--num 6]` draws all four for a checkpoint of
a pre-training run (`visualize_run`).
"""
import functools
import json
import os
import re
import textwrap
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from mpma_jax import checkpoint, losses, masking
from mpma_jax.constants import CLIP_MEAN, CLIP_STD
from mpma_jax.data import pipeline
from mpma_jax.data import tokenizer as tokenizers
from mpma_jax.models.mpma import MPMA

_NORM_PIX_EPS = 1e-6  # losses.mim_loss's eps, with which the norm_pix targets were standardised
# Colour of the masked patches in the "masked input" panel (no grey: the images mostly are).
_MASK_FILL = np.array([70, 110, 170], np.uint8)
_CURVE_PANELS = (  # (panel title, metrics.jsonl keys drawn in it)
    ("total loss", ("loss",)), ("MLM", ("mlm",)), ("MIM", ("mim",)), ("GLA global", ("global",)),
    ("GLA local", ("local",)), ("ITM", ("itm",)), ("accuracy", ("mlm_acc", "itm_acc")),
    ("temperature", ("temperature_global", "temperature_local")), ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)), ("examples / s", ("examples_per_sec",)))
# Function words skipped when the alignment picture picks its words by themselves.
_STOPWORDS = frozenset(
    "a an the of in on at to and or with without is are was were be been this that there these "
    "its it as by for from findings impression study examination".split())


# --- the model ------------------------------------------------------------------------------------
def _gla_tokens(module, images, text_ids, text_mask):
  return module.align(module.embed_image(images), module.embed_text(text_ids, text_mask))


@functools.lru_cache(maxsize=8)
def _jitted(model_config, method):
  model = MPMA(model_config)
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method))


def _apply(model_config, params, method, *args):
  """MPMA(model_config).apply({'params': params}, *args, method=method), jit-compiled once per
  (config, method), on host arrays."""
  fn = _jitted(ml_collections.FrozenConfigDict(model_config), method)
  return jax.device_get(fn(params, *args))


def gla_embeddings(model_config, params, images, text_ids, text_mask,
                   batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Unmasked encoders + GLA heads -> L2-normalised image [B, 1+P, G] and text [B, L, G] tokens
  (token 0 is the global embedding), in chunks of batch_size."""
  image_out, text_out = [], []
  for s in range(0, len(images), batch_size):
    i, t = _apply(model_config, params, _gla_tokens, np.asarray(images[s:s + batch_size]),
                  np.asarray(text_ids[s:s + batch_size]), np.asarray(text_mask[s:s + batch_size]))
    image_out.append(np.asarray(i, np.float32))
    text_out.append(np.asarray(t, np.float32))
  return np.concatenate(image_out), np.concatenate(text_out)


def _check_images(model_config, images) -> np.ndarray:
  images = np.asarray(images)
  size = model_config.image.size
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
    raise ValueError(f"images must be uint8 [B, {size}, {size}, 3] (model.image.size={size}); "
                     f"got {images.dtype} {images.shape}")
  return images


# --- MIM reconstructions --------------------------------------------------------------------------
def mim_panels(model_config, params, images, text_ids, text_mask, seed: int = 0,
               mask_ratio: float = 0.75) -> dict[str, np.ndarray]:
  """The MIM pass on MAE-masked images with their (unmasked) reports.

  Image i's mask is masking.image_mask(masking.example_rng(seed, 0, i), N, mask_ratio). With
  model.mim.norm_pix each predicted patch is un-normalised with the original patch's mean and std
  (as MAE's pictures do). Returns uint8 [B, H, W, 3] panels "original", "masked_input" (masked
  patches grey), "reconstruction" (visible patches from the original, masked ones predicted) and
  "prediction" (predicted everywhere); "masked" bool [B, N]; "mim_loss" float [B] (the training
  loss of each image: MSE on its masked patches, in target space).
  """
  images = _check_images(model_config, images)
  b, p = len(images), model_config.image.patch
  n = (model_config.image.size // p)**2
  masks = [masking.image_mask(masking.example_rng(seed, 0, i), n, mask_ratio) for i in range(b)]
  keep = np.stack([k for k, _ in masks])  # [B, n_keep]
  restore = np.stack([r for _, r in masks])  # [B, N]
  ids, mask = np.asarray(text_ids, np.int32), np.asarray(text_mask, np.int32)
  batch = {
      "image": images, "image_keep": keep, "image_restore": restore, "text_ids": ids,
      "mlm_ids": ids, "text_mask": mask
  }
  pred = np.asarray(_apply(model_config, params, None, batch)["mim_pred"], np.float32)  # [B,N,ppc]

  clip_pixels = (images.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD  # the model's input
  target = np.asarray(losses.patchify(clip_pixels, p))  # [B, N, p*p*3]
  if model_config.mim.norm_pix:
    mean = target.mean(-1, keepdims=True)
    ddof = 1 if model_config.mim.get("target_var_unbiased", False) else 0
    std = np.sqrt(target.var(-1, keepdims=True, ddof=ddof) + _NORM_PIX_EPS)
    loss_target, pred_pixels = (target - mean) / std, pred * std + mean
  else:
    loss_target, pred_pixels = target, pred
  masked = restore >= keep.shape[1]  # [B, N]
  per_patch = np.mean((pred - loss_target)**2, axis=-1)  # [B, N]
  mim_loss = (per_patch * masked).sum(-1) / np.maximum(masked.sum(-1), 1)

  rgb = np.asarray(losses.unpatchify(pred_pixels, p)) * CLIP_STD + CLIP_MEAN  # [B, H, W, 3]
  prediction = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
  masked_pixels = np.asarray(losses.unpatchify(np.repeat(masked[..., None], p * p * 3, axis=-1),
                                               p)).astype(bool)  # [B, H, W, 3]
  return {
      "original": images, "masked_input": np.where(masked_pixels, _MASK_FILL, images),
      "reconstruction": np.where(masked_pixels, prediction, images), "prediction": prediction,
      "masked": masked, "mim_loss": mim_loss
  }


def mim_reconstructions(model_config, params, images, text_ids, text_mask,
                        path: Optional[str] = None, seed: int = 0,
                        mask_ratio: float = 0.75) -> np.ndarray:
  """One row per image: original / masked input / reconstruction / prediction (see `mim_panels`).
  Writes a PNG to path (when given); returns the picture, uint8 [H, W, 3]."""
  panels = mim_panels(model_config, params, images, text_ids, text_mask, seed, mask_ratio)
  columns = (("original", "original"), ("masked_input", f"masked input ({mask_ratio:.0%})"),
             ("reconstruction", "reconstruction"), ("prediction", "prediction, all patches"))
  header = 0.2 if model_config.mim.norm_pix else 0.0
  fig, axes = _grid(len(images), [1.9] * len(columns), 1.8, 0.4, header)
  if header:
    fig.text(
        0.5, 1 - 0.05 / fig.get_figheight(), "norm_pix: each predicted patch is shown with "
        "the mean and std of the original patch (as MAE shows them)", fontsize=7, ha="center",
        va="top")
  for r in range(len(images)):
    for c, (key, title) in enumerate(columns):
      ax = axes[r, c]
      ax.imshow(panels[key][r], interpolation="nearest")
      ax.set_axis_off()
      if key == "reconstruction":
        title += f"\nMIM loss {panels['mim_loss'][r]:.3f}"
      ax.set_title(title, fontsize=8)
  return _render(fig, path)


# --- local alignment heatmaps ---------------------------------------------------------------------
def word_similarity_maps(model_config, params, images, text_ids, text_mask) -> np.ndarray:
  """Cosine similarity of every text token's GLA embedding with every patch's of its own image:
  float32 [B, L, g, g] (g = image.size // image.patch; patches row-major as in the ViT)."""
  images = _check_images(model_config, images)
  image_gla, text_gla = gla_embeddings(model_config, params, images, text_ids, text_mask)
  sim = np.einsum("blg,bpg->blp", text_gla, image_gla[:, 1:])  # [B, L, P]
  g = model_config.image.size // model_config.image.patch
  return sim.reshape(*sim.shape[:2], g, g)


def words(tokenizer, text_ids, word_mask) -> list[tuple[str, list[int]]]:
  """The real words of one tokenized text as (word, token positions): WordPiece '##' pieces and
  unmarked byte-level-BPE continuations join the piece before them."""
  ids = [int(i) for i in np.asarray(text_ids)]
  is_word = np.asarray(word_mask).astype(bool)
  tokens = tokenizer.convert_ids_to_tokens(ids)
  # Byte-level BPE (RoBERTa) / SentencePiece mark word *starts*; WordPiece marks continuations.
  starts_marked = any(t.startswith(("Ġ", "▁")) for t, w in zip(tokens, is_word) if w)
  groups = []  # token positions of each word
  for pos, (tok, real) in enumerate(zip(tokens, is_word)):
    if not real:
      continue
    continues = tok.startswith("##") or (  # (BPE: punctuation is split from words beforehand)
        starts_marked and not tok.startswith(("Ġ", "▁")) and any(ch.isalnum() for ch in tok))
    if continues and groups and groups[-1][-1] == pos - 1:
      groups[-1].append(pos)
    else:
      groups.append([pos])
  return [(tokenizer.convert_tokens_to_string([tokens[i] for i in g]).strip(), g) for g in groups]


def word_heatmap(maps: np.ndarray, positions: Sequence[int]) -> np.ndarray:
  """A word's map from one text's token maps [L, g, g]: the mean over its pieces -> [g, g]."""
  return np.mean(np.asarray(maps)[list(positions)], axis=0)


def pick_words(maps: np.ndarray, text_words: list, num: int) -> list[tuple[str, np.ndarray]]:
  """Up to `num` distinct words of one text with the highest peak similarity, skipping function
  words and tokens without a letter -> [(word, map [g, g])], best first."""
  best = {}
  for word, pos in text_words:
    if not any(ch.isalpha() for ch in word) or word.lower() in _STOPWORDS:
      continue
    m = word_heatmap(maps, pos)
    if word not in best or m.max() > best[word].max():
      best[word] = m
  return sorted(best.items(), key=lambda kv: -kv[1].max())[:num]


def alignment_heatmaps(model_config, params, images, text_ids, text_mask, word_mask, tokenizer,
                       path: Optional[str] = None, words_per_image: int = 4) -> np.ndarray:
  """One row per image: its report, the image, then the words the image matches best (see
  `pick_words`), each word's patch similarity upsampled (bilinear) and overlaid in jet colours
  (blue low, red high) on a scale shared along the row. Writes a PNG to path (when given);
  returns the picture uint8 [H, W, 3]."""
  images = _check_images(model_config, images)
  maps = word_similarity_maps(model_config, params, images, text_ids, text_mask)  # [B, L, g, g]
  size = model_config.image.size
  extent = (0, size, size, 0)  # the map's cell [0, 0] on the image's top-left patch
  fig, axes = _grid(len(images), [2.4] + [1.9] * (1 + words_per_image), 1.8, 0.4)
  for r in range(len(images)):
    chosen = pick_words(maps[r], words(tokenizer, text_ids[r], word_mask[r]), words_per_image)
    _caption(axes[r, 0], _report(tokenizer, text_ids[r], text_mask[r]), 36, 10)
    axes[r, 1].imshow(images[r], extent=extent)
    axes[r, 1].set_title("image", fontsize=8)
    lo = min((m.min() for _, m in chosen), default=0.0)
    hi = max((m.max() for _, m in chosen), default=1.0)
    for c, (word, m) in enumerate(chosen, start=2):
      ax = axes[r, c]
      ax.imshow(images[r], extent=extent)
      ax.imshow(m, cmap="jet", alpha=0.45, extent=extent, interpolation="bilinear", vmin=lo,
                vmax=hi)
      ax.set_title(f"{word}\ncos {m.min():.2f} to {m.max():.2f}", fontsize=8)
    for ax in axes[r, 1:]:
      ax.set_axis_off()
  return _render(fig, path)


# --- retrieval examples ---------------------------------------------------------------------------
def retrieval_ranking(model_config, params, images, text_ids, text_mask,
                      k: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """GLA global similarity sim [N_images, N_texts] and, for each text as the query, the indices of
  its top-k images (most similar first; ties by lower index) -> (sim, top [N_texts, k])."""
  image_gla, text_gla = gla_embeddings(model_config, params, _check_images(model_config, images),
                                       text_ids, text_mask)
  sim = image_gla[:, 0] @ text_gla[:, 0].T  # [N_images, N_texts]
  return sim, top_images(sim, k)


def top_images(sim: np.ndarray, k: int) -> np.ndarray:
  """sim [N_images, N_texts] -> for each text, its k most similar images [N_texts, k]; ties go to
  the lower image index."""
  return np.argsort(-np.asarray(sim).T, axis=1, kind="stable")[:, :k]


def retrieval_examples(model_config, params, pairs: dict, tokenizer, path: Optional[str] = None,
                       num_queries: int = 4, k: int = 5) -> np.ndarray:
  """Text -> image retrieval among all of `pairs` (image, text_ids, text_mask; pair i matches
  image i): the first num_queries reports and their top-k images, the true match framed green.
  Writes a PNG to path (when given); returns the picture uint8 [H, W, 3]."""
  images = pairs["image"]
  sim, top = retrieval_ranking(model_config, params, images, pairs["text_ids"], pairs["text_mask"],
                               k)
  num_queries = min(num_queries, len(images))
  fig, axes = _grid(num_queries, [2.6] + [1.9] * k, 1.8, 0.25)
  for q in range(num_queries):
    rank = int(np.sum(sim[:, q] > sim[q, q])) + 1  # the true image's rank (ties count for it)
    _caption(axes[q, 0], _report(tokenizer, pairs["text_ids"][q], pairs["text_mask"][q]), 38, 9,
             f"true image: rank {rank} of {len(images)}")
    for c, i in enumerate(top[q], start=1):
      ax = axes[q, c]
      ax.imshow(images[i])
      ax.set_xticks([])
      ax.set_yticks([])
      hit = i == q
      for spine in ax.spines.values():
        spine.set_visible(hit)
        spine.set_color("limegreen")
        spine.set_linewidth(4)
      ax.set_title(f"#{c}  {sim[i, q]:.2f}" + ("  match" if hit else ""), fontsize=8,
                   color="green" if hit else "black")
  return _render(fig, path)


# --- training curves ------------------------------------------------------------------------------
def read_curves(metrics_path: str,
                split: str = "train") -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metrics.jsonl -> {metric: (steps int [n], values float [n])}, steps ascending. A step logged
  twice (a run resumed from an earlier checkpoint) keeps its last line; unreadable lines (a write
  cut short) are skipped."""
  rows = {}
  with open(metrics_path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and row.get("split") == split and "step" in row:
        rows[int(row["step"])] = row
  curves = {}
  for step in sorted(rows):
    for key, value in rows[step].items():
      if key not in ("step", "split") and isinstance(value, (int, float)):
        curves.setdefault(key, ([], []))
        curves[key][0].append(step)
        curves[key][1].append(float(value))
  return {k: (np.array(s, np.int64), np.array(v, np.float64)) for k, (s, v) in curves.items()}


def training_curves(metrics_path: str, path: Optional[str] = None,
                    mark_step: Optional[int] = None) -> np.ndarray:
  """One panel per loss component and for accuracy, temperatures, learning rate, gradient norm
  and throughput (those the run logged), train split vs step; mark_step (a checkpoint's) is drawn
  as a dashed line. Writes a PNG to path (when given); returns the picture uint8 [H, W, 3]."""
  curves = read_curves(metrics_path)
  panels = [(t, [k for k in keys if k in curves]) for t, keys in _CURVE_PANELS]
  panels = [(t if len(keys) > 1 or len(all_keys) == 1 else f"{t} ({keys[0]})", keys)
            for (t, all_keys), (_, keys) in zip(_CURVE_PANELS, panels) if keys]
  if not panels:
    raise ValueError(f"{metrics_path} has no train-split metrics to plot")
  cols = min(4, len(panels))
  rows = -(-len(panels) // cols)
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(3.2 * cols, 2.4 * rows), dpi=100)
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.set_axis_off()
  for ax, (title, keys) in zip(axes.flat, panels):
    for key in keys:
      steps, values = curves[key]
      ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
    if mark_step is not None:
      ax.axvline(mark_step, color="grey", linestyle="--", linewidth=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return _render(fig, path)


# --- drawing and TensorBoard ----------------------------------------------------------------------
def _grid(rows: int, widths: Sequence[float], axes_h: float, title_h: float, header_h: float = 0.0):
  """A matplotlib Figure (not pyplot: no global state) of rows x len(widths) axes, sized in inches:
  each row is title_h of title above axes_h of axes, under a header_h strip for a caption.
  Returns (figure, axes [rows, cols])."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  margin = 0.05
  w, h = sum(widths) + 2 * margin, header_h + rows * (title_h + axes_h) + 2 * margin
  fig = Figure(figsize=(w, h), dpi=100)
  axes = fig.subplots(
      rows, len(widths), squeeze=False,
      gridspec_kw=dict(width_ratios=widths, left=margin / w, right=1 - margin / w,
                       bottom=margin / h, top=1 - (margin + header_h + title_h) / h,
                       hspace=title_h / axes_h, wspace=0.06))
  return fig, axes


def _caption(ax, text: str, width: int, lines: int, footer: str = "") -> None:
  """Wrapped text (at most `lines` lines, then the footer), left-aligned and vertically centred,
  in place of an axes' picture."""
  ax.set_axis_off()
  text = "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder=" ..."))
  ax.text(0.0, 0.5, text + (f"\n\n{footer}" if footer else ""), fontsize=7, va="center", ha="left",
          transform=ax.transAxes)


def _report(tokenizer, ids, mask) -> str:
  """A tokenized text back as readable text (WordPiece decoding leaves ' : ', ' - ', '( ')."""
  text = tokenizer.decode([int(i) for i, m in zip(ids, mask) if m], skip_special_tokens=True)
  text = re.sub(r" ([.,:;!?)\]])", r"\1", text)
  return re.sub(r"([(\[]) ", r"\1", text).replace(" - ", "-").replace(" / ", "/")


def _render(fig, path: Optional[str]) -> np.ndarray:
  """Draws the figure with Agg -> uint8 [H, W, 3]; also writes it as a PNG to path (when given)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(rgb).save(path)
  return rgb


def to_tensorboard(writer, pictures: dict[str, np.ndarray], step: int,
                   prefix: str = "pictures") -> None:
  """Logs each picture (uint8 [H, W, 3]) as image summary '<prefix>/<name>' at step. writer: a
  tensorboardX SummaryWriter, or a log directory (a writer is opened and closed here)."""
  own = isinstance(writer, (str, os.PathLike))
  w = SummaryWriter(os.fspath(writer)) if own else writer
  for name, rgb in pictures.items():
    w.add_image(f"{prefix}/{name}", np.asarray(rgb, np.uint8), step, dataformats="HWC")
  w.flush()
  if own:
    w.close()


# --- a run's checkpoint ---------------------------------------------------------------------------
def visualize_run(workdir: str, step: Optional[int] = None, out: Optional[str] = None, num: int = 6,
                  gallery: int = 100) -> list[str]:
  """All four pictures for a checkpoint (default: the latest) of a pre-training run, on `num`
  held-out pairs of the run's first dataset (test split; retrieval ranks among `gallery` pairs).
  Writes <out or workdir/pictures>/{mim,alignment,retrieval,curves}_step<N>.png (curves, of the
  whole run with step N marked, when the run has metrics.jsonl) and the same images to
  <workdir>/tb at step N; returns the PNG paths."""
  config = checkpoint.run_config(workdir)
  params, step = checkpoint.restore_params(workdir, step)
  tok = tokenizers.load_tokenizer(os.path.join(workdir, "tokenizer"))
  gallery = max(num, min(gallery, config.eval.num_pairs))
  pairs = pipeline.eval_pairs(config, tok, gallery, pipeline.data_dir_for(config, workdir))
  few = {k: v[:num] for k, v in pairs.items()}
  out = out or os.path.join(workdir, "pictures")
  path = lambda name: os.path.join(out, f"{name}_step{step}.png")
  m = config.model
  pictures = {
      "mim": mim_reconstructions(m, params, few["image"], few["text_ids"], few["text_mask"],
                                 path("mim"), seed=config.seed,
                                 mask_ratio=config.masking.image_ratio),
      "alignment": alignment_heatmaps(m, params, few["image"], few["text_ids"], few["text_mask"],
                                      few["word_mask"], tok, path("alignment")),
      "retrieval": retrieval_examples(m, params, pairs, tok, path("retrieval"), num_queries=num),
  }
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics):
    pictures["curves"] = training_curves(metrics, path("curves"), mark_step=step)
  to_tensorboard(os.path.join(workdir, "tb"), pictures, step)
  return [path(name) for name in pictures]
