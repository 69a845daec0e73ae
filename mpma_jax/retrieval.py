"""Zero-shot image <-> text retrieval from the GLA global embeddings: the end of every pre-training
run, and ROCO retrieval in fine-tuning."""
import jax
import numpy as np

from mpma_jax import metrics
from mpma_jax.models.mpma import MPMA

KS = (1, 5, 10)


def _global_embeddings(module: MPMA, image, text_ids, text_mask):
  image_gla, text_gla = module.align(module.embed_image(image),
                                     module.embed_text(text_ids, text_mask))
  return image_gla[:, 0], text_gla[:, 0]  # [B, G] each, L2-normalised


def make_embed_fn(model: MPMA, mesh=None):
  """jit-compiled (params, image, text_ids, text_mask) -> (image_emb [B, G], text_emb [B, G]).

  With a mesh the embeddings come back replicated, so that every host can read them (the
  parameters may be sharded over several hosts; the inputs are the same NumPy arrays on each).
  """
  out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
      lambda params, image, ids, mask: model.apply({"params": params}, image, ids, mask, method=
                                                   _global_embeddings), out_shardings=out)


def evaluate(embed_fn, params, pairs: dict, batch_size: int) -> dict:
  """R@1/5/10 in both directions for N pairs ranked all against all (NaN when any similarity is
  not finite)."""
  n = len(pairs["image"])
  image_emb, text_emb = [], []
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in pairs.items()}
    i, t = embed_fn(params, chunk["image"], chunk["text_ids"], chunk["text_mask"])
    image_emb.append(np.asarray(i))
    text_emb.append(np.asarray(t))
  sim = np.concatenate(image_emb) @ np.concatenate(text_emb).T  # [N, N], image rows
  return recall(sim)


def chance(num_pairs: int) -> dict:
  """Expected recall of a random ranking."""
  return {f"{d}_r{k}": min(k / num_pairs, 1.0) for d in ("i2t", "t2i") for k in KS}


def format_table(rows: dict) -> str:
  """rows: name -> recall dict (fractions) -> a fixed-width table in percent."""
  cols = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS]
  lines = [f"{'':<10}" + "".join(f"{c:>9}" for c in cols)]
  for name, r in rows.items():
    lines.append(f"{name:<10}" + "".join(f"{100 * r[c]:>9.2f}" for c in cols))
  return "\n".join(lines)


def recall(sim, ks=KS) -> dict:
  """sim [N, N], row i's positive in column i -> {"i2t_r1": ..., "t2i_r1": ...} as floats in [0, 1].

  A candidate that ties with the positive counts as ranked above it (pessimistic), so a constant
  similarity matrix scores as badly as possible rather than perfectly. See metrics.recall_at_k
  (several captions per image).
  """
  sim = np.asarray(jax.device_get(sim))
  if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
    raise ValueError(f"retrieval.recall needs a square similarity matrix, got {sim.shape}")
  return metrics.recall_at_k(sim, ks)
