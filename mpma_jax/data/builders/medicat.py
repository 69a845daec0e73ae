"""MedICaT (Subramanian et al. 2020): the radiology figures of PubMed Central papers, with captions
and the sentences that refer to them; the prior split (seed 42, last 2,000 held out; a copy with
fewer figures holds out a tenth of them, at least 2: see `held_out`)."""
import json
import os

import numpy as np

from mpma_jax.data.builders import base

JSONL = "release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"


class Medicat(base.Builder):
  """MedICaT radiology figures: s2_caption plus inline references (train / validation / test)."""
  TASK = "pretrain"
  SEED = 42
  HELD_OUT = 2000  # the last HELD_OUT shuffled figures: first half validation, second half test
  HELD_FRACTION = 0.1  # ... or this fraction of a smaller copy (the public sample, a subset)
  LAYOUT = f"""\
  {JSONL}
                  one JSON object per line: pdf_hash, fig_uri, s2_caption, s2orc_references (list
                  or null), radiology (bool), ...
  release/figures/{{pdf_hash}}_{{fig_uri}}"""

  def _split_paths(self, manual_dir):
    path, figures = self.require(manual_dir, JSONL, "release/figures")
    records = self._radiology_records(path)
    if len(records) < 3:
      raise ValueError(f"{self.name}: {path!r} lists {len(records)} usable radiology figure(s) "
                       f"(skipped: {dict(self.skipped['train'])}); a train / validation / test "
                       "split needs at least 3")
    # The split is decided on the records, before any image is looked at, so that a figure the
    # user could not fetch does not move other figures between splits.
    order = np.random.default_rng(self.SEED).permutation(len(records))
    shuffled = [records[i] for i in order]
    n_train = len(shuffled) - self.held_out(len(shuffled))
    held = shuffled[n_train:]
    return {
        "train": {"records": shuffled[:n_train], "figures": figures},
        "validation": {"records": held[:len(held) // 2], "figures": figures},
        "test": {"records": held[len(held) // 2:], "figures": figures}
    }

  def held_out(self, n: int) -> int:
    """Figures held out of n for validation + test: HELD_OUT (the prior split) when that leaves
    most for training, else HELD_FRACTION of them, at least 2 (one each); ValueError when n < 3."""
    if n < 3:
      raise ValueError(f"{self.name}: {n} usable radiology figure(s); a train / validation / "
                       "test split needs at least 3")
    return min(self.HELD_OUT, max(2, round(self.HELD_FRACTION * n)))

  def _radiology_records(self, path):
    """The radiology figures in file order, as (pdf_hash, fig_uri, caption, references)."""
    records, seen = [], set()
    with open(path, "rb") as f:
      for line in f:
        if not line.strip():
          continue
        # Lines that are dropped before the split is decided belong to no split; they are counted
        # under train, the split that holds everything not held out.
        try:
          r = json.loads(line)
          key = (str(r["pdf_hash"]), str(r["fig_uri"]))
        except (ValueError, TypeError, KeyError):  # bad JSON / UTF-8, not an object, no id fields
          self.skip("train", "malformed json line")
          continue
        if r.get("radiology") is not True:
          self.skip("train", "not radiology")
          continue
        if key in seen:  # the same figure twice: kept once, before the split is drawn
          self.skip("train", "duplicate")
          continue
        seen.add(key)
        references = r.get("s2orc_references") or []
        if isinstance(references, str):  # a lone sentence, not a list of them
          references = [references]
        records.append((*key, r.get("s2_caption"), references))
    return records

  def _examples(self, split, records, figures):
    for pdf_hash, fig_uri, caption, references in records:
      texts = self.clean_texts(split, [caption, *references])
      if not texts:
        self.skip(split, "no usable text")
        continue
      name = f"{pdf_hash}_{fig_uri}"
      image = self.read_image(split, os.path.join(figures, name))
      if image is None:
        continue
      yield name, {"id": name, "image": image, "texts": texts}
