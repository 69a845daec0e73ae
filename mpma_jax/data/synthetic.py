"""Built-in synthetic radiology data: rendered images, reports that describe them, and VQA pairs.

Each example is a `Case` (modality, organ, 0-3 lesions) drawn deterministically from
(seed, split, index). `render_image` draws it with a modality-specific look (CT cross-section on a
couch, MRI with bright fluid and a bias field, projection X-ray with ribs and spine, ultrasound
fan with speckle) and an organ-specific outline; `write_report` states everything visible, so
image<->text retrieval and VQA are learnable from pixels. Lesion descriptions combine 9 regions x
3 sizes x 2 intensities, so a few hundred held-out pairs are mostly distinct.

Geometry lives in normalised coordinates x, y in [-1, 1] (x left->right, y top->bottom), so the
picture is the same at every `size`. Reports are plain lowercase words and punctuation; over 20k
training reports they have at most 34 words and 42 WordPiece tokens with [CLS]/[SEP] (mean 26,
90th percentile 38) with a tokenizer trained by `tokenizer.train_wordpiece`.
"""
import dataclasses
from typing import Iterator

import numpy as np

SPLITS = ("train", "validation", "test")
MODALITIES = ("CT", "MRI", "X-ray", "ultrasound")
ORGANS = ("head", "chest", "abdomen")
# Row-major 3x3 grid; the index is the cell (row * 3 + col).
REGIONS = ("upper left", "upper middle", "upper right", "middle left", "center", "middle right",
           "lower left", "lower middle", "lower right")
SIZES = ("small", "medium", "large")
INTENSITIES = ("bright", "dark")

# Lesion radius in normalised units (image half-width = 1): 2.9 / 4.8 / 7.0 px at 64 px.
_RADIUS = {"small": 0.09, "medium": 0.15, "large": 0.22}
_CELL_CENTER = (-0.5, 0.0, 0.5)  # grid covers [-0.75, 0.75]; cells are 0.5 wide
_LESION_WEIGHTS = (0.15, 0.35, 0.30, 0.20)  # P(0..3 lesions): 1-2 lesions are the common case
_NUMBER = ("no", "one", "two", "three")
# Modality-specific wording for the parenthetical in some reports.
_TECH_TERM = {
    ("CT", "bright"): "hyperdense",
    ("CT", "dark"): "hypodense",
    ("MRI", "bright"): "hyperintense",
    ("MRI", "dark"): "hypointense",
    ("X-ray", "bright"): "opaque",
    ("X-ray", "dark"): "lucent",
    ("ultrasound", "bright"): "hyperechoic",
    ("ultrasound", "dark"): "hypoechoic",
}


@dataclasses.dataclass(frozen=True)
class Lesion:
  region: str  # one of REGIONS
  size: str  # one of SIZES
  intensity: str  # one of INTENSITIES
  # Placement jitter inside the cell (normalised units) and radius factor; not part of the text.
  dx: float = 0.0
  dy: float = 0.0
  scale: float = 1.0

  @property
  def description(self) -> tuple[str, str, str]:
    return (self.region, self.size, self.intensity)


@dataclasses.dataclass(frozen=True)
class Case:
  modality: str  # one of MODALITIES
  organ: str  # one of ORGANS
  lesions: tuple[Lesion, ...]  # largest first, then by region index; regions distinct
  body_scale: float = 1.0  # per-case anatomy size
  contrast: float = 1.0  # per-case anatomy contrast around mid-gray

  @property
  def description(self) -> tuple:
    """What the report states: (modality, organ, ((region, size, intensity), ...))."""
    return (self.modality, self.organ, tuple(l.description for l in self.lesions))


def _split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return SPLITS.index(split)


def sample_case(seed: int, split: str, index: int) -> Case:
  """The case for (seed, split, index); each split has its own RNG stream."""
  rng = np.random.default_rng([seed, _split_id(split), index])
  modality = MODALITIES[rng.integers(len(MODALITIES))]
  organ = ORGANS[rng.integers(len(ORGANS))]
  n = rng.choice(len(_LESION_WEIGHTS), p=_LESION_WEIGHTS)
  regions = rng.choice(len(REGIONS), size=n, replace=False)
  sizes = rng.integers(len(SIZES), size=n)
  shades = rng.integers(len(INTENSITIES), size=n)
  jitter = rng.uniform(-1.0, 1.0, size=(n, 3))
  # Canonical order (largest first) so "the first lesion" is the largest one in reports and QA.
  order = sorted(range(n), key=lambda i: (-sizes[i], regions[i]))
  lesions = tuple(
      Lesion(REGIONS[regions[i]], SIZES[sizes[i]], INTENSITIES[shades[i]], dx=0.05 *
             float(jitter[i, 0]), dy=0.05 * float(jitter[i, 1]), scale=1.0 +
             0.1 * float(jitter[i, 2])) for i in order)
  body_scale, contrast = rng.uniform([0.93, 0.85], [1.03, 1.1])
  return Case(modality, organ, lesions, body_scale=float(body_scale), contrast=float(contrast))


# --------------------------------------------------------------------------------------------
# Rendering.


def _ellipse(x, y, cx, cy, rx, ry, px):
  """Anti-aliased filled ellipse in [0, 1]; `px` is one pixel in normalised units."""
  d = np.sqrt(((x - cx) / rx)**2 + ((y - cy) / ry)**2)  # [S, S]
  return np.clip((1.0 - d) * (min(rx, ry) / px) + 0.5, 0.0, 1.0)


def _paint(img, c, cx, cy, rx, ry, value, px):
  """Blends `value` into img [S, S] inside an ellipse, in place, touching only its bounding box
  (most shapes are small, so this keeps rendering cheap at 288 px)."""
  r0, r1 = np.searchsorted(c, [cy - ry - px, cy + ry + px])
  c0, c1 = np.searchsorted(c, [cx - rx - px, cx + rx + px])
  if r0 == r1 or c0 == c1:
    return
  m = _ellipse(c[None, c0:c1], c[r0:r1, None], cx, cy, rx, ry, px)  # [h, w]
  box = img[r0:r1, c0:c1]
  box += (value - box) * m


def _half_res_noise(rng, size: int) -> np.ndarray:
  """Standard normal noise with 2-pixel grain, [S, S]."""
  h = (size + 1) // 2
  n = rng.standard_normal((h, h), dtype=np.float32)
  return n.repeat(2, axis=0).repeat(2, axis=1)[:size, :size]


# Tissue gray levels per modality. Lesions are drawn at absolute levels (_LESION_LEVEL) so they
# stand out against the soft tissue (~0.45) that fills most of every region; lungs ("air") are
# kept at >= 0.26, brighter than real, so that dark lesions in them stay visible.
_TISSUE = {
    "CT": dict(bg=0.0, fat=0.36, soft=0.46, bone=0.95, air=0.26, fluid=0.32, organ=0.58),
    # T2-like: fluid and fat bright, cortical bone dark.
    "MRI": dict(bg=0.02, fat=0.82, soft=0.48, bone=0.10, air=0.26, fluid=0.88, organ=0.34),
    "X-ray": dict(bg=0.06, fat=0.38, soft=0.38, bone=0.85, air=0.26, fluid=0.38, organ=0.48),
    "ultrasound": dict(bg=0.45, fat=0.45, soft=0.45, bone=0.85, air=0.28, fluid=0.05, organ=0.60),
}
_LESION_LEVEL = {"bright": 0.97, "dark": 0.02}


def _anatomy(case: Case, c, px):
  """The case's organ in its modality's gray levels: (body mask, image), both [S, S] float32."""
  t = _TISSUE[case.modality]
  s = case.body_scale
  x, y = c[None, :], c[:, None]
  projection = case.modality == "X-ray"

  def paint(cx, cy, rx, ry, value):
    _paint(img, c, cx * s, cy * s, rx * s, ry * s, value, px)

  if case.organ == "head":
    body = _ellipse(x, y, 0.0, 0.0, 0.82 * s, 0.94 * s, px)
    img = t["bone"] * body  # skull, then brain inside it
    paint(0.0, 0.0, 0.70 if projection else 0.74, 0.82 if projection else 0.86, t["soft"])
    for cx in (-0.13, 0.13):  # lateral ventricles
      paint(cx, -0.05, 0.07, 0.22, t["fluid"])
    if projection:  # skull base and facial bones overlap in a projection
      paint(0.0, 0.72, 0.6, 0.12, 0.8 * t["bone"])
    return body, img

  if projection:  # torso silhouette filling the film, not a cross-section
    body = np.clip((1.0 - (np.abs(x) / (0.9 * s))**4 - (np.abs(y - 0.1) / 1.1)**4) / (8 * px), 0.0,
                   1.0)
    img = t["soft"] * body
  else:  # cross-section with a rim of subcutaneous fat
    body = _ellipse(x, y, 0.0, 0.02 * s, 0.93 * s, 0.8 * s, px)
    img = t["fat"] * body
    paint(0.0, 0.02, 0.86, 0.73, t["soft"])
  if case.organ == "chest":
    for cx in (-0.42, 0.42):
      paint(cx, -0.05, 0.32, 0.55, t["air"])
    if projection:  # ribs: bright curved bands over the lungs
      lungs = (np.abs(np.abs(x / s) - 0.42) < 0.3) & (np.abs(y / s + 0.05) < 0.5)
      img += 0.22 * ((np.sin(np.pi * 9.0 * (y - 0.25 * x**2)) > 0.55) & lungs)
    paint(0.1, 0.22, 0.3, 0.26, t["organ"])  # heart
  else:  # abdomen
    paint(-0.35, -0.22, 0.48, 0.36, t["organ"])  # liver
    for cx in (-0.45, 0.45):  # kidneys
      paint(cx, 0.35, 0.13, 0.21, 0.8 * t["organ"])
    paint(0.3, -0.25, 0.14, 0.1, t["air"])  # stomach bubble
    if projection:  # pelvic ring at the bottom
      paint(0.0, 0.95, 0.7, 0.35, 0.85 * t["bone"])
      paint(0.0, 0.95, 0.6, 0.26, t["soft"])
  if projection:  # spine: a vertical band through the whole torso
    band = np.clip((0.08 * s - np.abs(x)) / px + 0.5, 0.0, 1.0) * body
    img = np.maximum(img, 0.75 * t["bone"] * band)
  else:
    paint(0.0, 0.62, 0.1, 0.1, t["bone"])  # vertebral body
  return body, img


def render_image(case: Case, size: int, *, seed: int = 0, index: int = 0) -> np.ndarray:
  """Draws the case: uint8 [size, size, 3], grayscale copied to RGB; noise from (seed, index)."""
  if size < 16:
    raise ValueError(f"image size must be >= 16, got {size}")
  if case.modality not in MODALITIES or case.organ not in ORGANS:
    raise ValueError(f"case must have modality in {MODALITIES} and organ in {ORGANS}, got "
                     f"{case.modality!r}, {case.organ!r}")
  rng = np.random.default_rng([seed, index])
  c = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(2.0 / size) - 1.0  # pixel centres
  x, y = c[None, :], c[:, None]  # broadcast to [S, S]
  px = 2.0 / size
  t = _TISSUE[case.modality]
  body, img = _anatomy(case, c, px)  # [S, S] each
  img = (0.5 + (img - 0.5) * case.contrast) * body + t["bg"] * (1 - body)

  # Noise is drawn before the lesions and in a fixed order, so the same (seed, index) gives the
  # same noise with or without lesions (tests locate lesions this way).
  if case.modality == "CT":
    couch = np.clip((0.03 - np.abs(y - (0.93 + 0.12 * x**2))) / px + 0.5, 0.0, 1.0)
    img = np.maximum(img, 0.5 * couch)
    noise = 0.03 * rng.standard_normal((size, size), dtype=np.float32) * body
  elif case.modality == "MRI":
    g = rng.standard_normal((2, 3), dtype=np.float32)  # smooth coil bias field
    gain = 1.0 + 0.06 * (g[0, 0] * x + g[0, 1] * y + g[0, 2] * x * y + g[1, 0] * x**2 +
                         g[1, 1] * y**2 + g[1, 2])
    noise = 0.02 * rng.standard_normal((size, size), dtype=np.float32)
  elif case.modality == "X-ray":
    gain = 1.08 - 0.08 * (y + 1.0)  # heel effect: brighter at the top
    noise = 0.025 * _half_res_noise(rng, size)
  else:  # ultrasound: a fan from an apex above the image
    yy = y + 1.35
    r = np.sqrt(x**2 + yy**2)
    # Inside |angle| < 0.85 rad and r < 2.3; the side edges via |x| < tan(0.85) * yy.
    fan = (np.clip((1.137 * yy - np.abs(x)) * (0.66 / px) + 0.5, 0.0, 1.0) * np.clip(
        (2.3 - r) / px + 0.5, 0.0, 1.0))
    depth = 1.1 - 0.18 * (r - 0.35)
    rayleigh = np.hypot(_half_res_noise(rng, size), _half_res_noise(rng, size)) / 1.2533  # mean 1
    speckle = 0.4 + 0.6 * rayleigh  # milder than real speckle so small lesions stay visible

  for lesion in case.lesions:
    row, col = divmod(REGIONS.index(lesion.region), 3)
    rad = _RADIUS[lesion.size] * lesion.scale
    _paint(img, c, _CELL_CENTER[col] + lesion.dx, _CELL_CENTER[row] + lesion.dy, rad, rad,
           _LESION_LEVEL[lesion.intensity], px)

  if case.modality == "CT":
    img += noise
  elif case.modality in ("MRI", "X-ray"):
    img = img * gain + noise
  else:
    img *= depth * speckle * fan
  img = np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
  return np.repeat(img[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------------------------
# Text.

_OPENINGS = ("{m} of the {o}.", "{m} image of the {o}.", "{o} {m}.", "{m} study of the {o}.",
             "{m} examination of the {o}.")
_NORMAL = ("no focal abnormality.", "no focal abnormality is seen.",
           "there is no focal abnormality.", "findings: no focal abnormality.")
_COUNT = ("{n} {lesions}:", "{n} {lesions} seen:", "there {are} {n} {lesions}:",
          "findings: {n} {lesions},")
_NOUNS = ("lesion", "lesion", "focus", "nodule", "mass")
_LESION = ("a {s} {i} {noun} in the {r}", "{s} {i} {noun} in the {r}",
           "a {i} {s} {noun} at the {r}", "a {s} {noun} in the {r}, {i}"
          )  # reads ambiguously in a list: single lesion only

_ARTICLE = {"ct": "a", "mri": "an", "x-ray": "an", "ultrasound": "an"}


def _modality_word(modality: str) -> str:
  return modality.lower()  # "ct", "mri", "x-ray", "ultrasound": the tokenizer is uncased anyway


def write_report(case: Case, rng: np.random.Generator) -> str:
  """A short templated report stating modality, organ, lesion count and each lesion's
  region, size and intensity (or "no focal abnormality"); the phrasing varies with `rng`."""
  m, o = _modality_word(case.modality), case.organ
  parts = [_OPENINGS[rng.integers(len(_OPENINGS))].format(m=m, o=o)]
  n = len(case.lesions)
  if n == 0:
    parts.append(_NORMAL[rng.integers(len(_NORMAL))])
    if rng.random() < 0.3:
      parts.append("normal study.")
  else:
    parts.append(_COUNT[rng.integers(len(_COUNT))].format(n=_NUMBER[n],
                                                          lesions="lesion" if n == 1 else "lesions",
                                                          are="is" if n == 1 else "are"))
    phrases = []
    for lesion in case.lesions:
      phrase = _LESION[rng.integers(len(_LESION) if n == 1 else len(_LESION) - 1)].format(
          s=lesion.size, i=lesion.intensity, r=lesion.region,
          noun=_NOUNS[rng.integers(len(_NOUNS))])
      if n == 1 and rng.random() < 0.5:  # the technical word only where the length allows
        phrase += f" ({_TECH_TERM[case.modality, lesion.intensity]})"
      phrases.append(phrase)
    body = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    parts.append(body + ".")
  return " ".join(parts)


def questions(case: Case) -> list[dict]:
  """VQA pairs about the case; CLOSED answers are yes/no, OPEN answers are single phrases.

  Deterministic in the case. Most closed questions come in true/false pairs (the true modality
  and the next one in MODALITIES, ...), so a question's text alone does not give its answer.
  """
  m, o = _modality_word(case.modality), case.organ
  other_m = _modality_word(MODALITIES[(MODALITIES.index(case.modality) + 1) % len(MODALITIES)])
  other_o = ORGANS[(ORGANS.index(case.organ) + 1) % len(ORGANS)]
  n = len(case.lesions)

  def q(question, answer, qtype, closed):
    return {
        "question": question, "answer": answer, "answer_type": "CLOSED" if closed else "OPEN",
        "question_type": qtype
    }

  out = [
      q("what imaging modality is this?", m, "MODALITY", False),
      q(f"is this {_ARTICLE[m]} {m} image?", "yes", "MODALITY", True),
      q(f"is this {_ARTICLE[other_m]} {other_m} image?", "no", "MODALITY", True),
      q("which organ is shown?", o, "ORGAN", False),
      q(f"is this an image of the {o}?", "yes", "ORGAN", True),
      q(f"is this an image of the {other_o}?", "no", "ORGAN", True),
      q("how many lesions are there?", str(n), "COUNT", False),
      q("is there a focal abnormality?", "yes" if n else "no", "PRES", True),
  ]
  # An empty region for a "no" answer: opposite the first lesion, or the next free one after it.
  occupied = {l.region for l in case.lesions}
  first = REGIONS.index(case.lesions[0].region) if n else 4
  empty = next(r for k in range(9) if (r := REGIONS[(8 - first + k) % 9]) not in occupied)
  out.append(q(f"is there a lesion in the {empty}?", "no", "POS", True))
  if n:
    big = case.lesions[0]
    out.append(q(f"is there a lesion in the {big.region}?", "yes", "POS", True))
    if n == 1:
      out.append(q("where is the lesion?", big.region, "POS", False))
    elif big.size != case.lesions[1].size:  # "largest" only when it is unique
      out.append(q("where is the largest lesion?", big.region, "POS", False))
    out.append(q(f"what size is the lesion in the {big.region}?", big.size, "SIZE", False))
    out.append(
        q(f"is the lesion in the {big.region} bright or dark?", big.intensity, "ATTRIB", False))
    # Which shade is asked must not depend on the answer, or the question text would give it away.
    asked = INTENSITIES[(REGIONS.index(big.region) + SIZES.index(big.size)) % 2]
    out.append(
        q(f"is the lesion in the {big.region} {asked}?", "yes" if asked == big.intensity else "no",
          "ATTRIB", True))
  return out


# --------------------------------------------------------------------------------------------
# Sources.


def _report_rng(seed: int, split: str, index: int) -> np.random.Generator:
  # A stream separate from the case's (4 words vs 3), so phrasing does not shift the content.
  return np.random.default_rng([seed, _split_id(split), index, 1])


def report(seed: int, split: str, index: int) -> str:
  """The report of example `index`, exactly as SyntheticSource returns it."""
  return write_report(sample_case(seed, split, index), _report_rng(seed, split, index))


class SyntheticSource:
  """Grain random-access source of synthetic (image, report) examples; cheap and picklable."""
  def __init__(self, split: str = "train", num_examples: int = 10_000, image_size: int = 64,
               seed: int = 0):
    _split_id(split)
    if num_examples < 0:
      raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    self.split, self.num_examples, self.image_size, self.seed = (split, int(num_examples),
                                                                 int(image_size), int(seed))

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} outside [0, {self.num_examples}) of SyntheticSource")
    case = sample_case(self.seed, self.split, index)
    return {
        "index": np.int64(index),
        "image": render_image(case, self.image_size, seed=self.seed, index=index),  # [S, S, 3]
        "report": write_report(case, _report_rng(self.seed, self.split, index)),
        "modality": case.modality,
        "organ": case.organ,
        "num_lesions": len(case.lesions),
    }

  def __repr__(self) -> str:
    return (f"SyntheticSource(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed})")


def report_corpus(num_examples: int, seed: int = 0, split: str = "train") -> Iterator[str]:
  """The reports of the first `num_examples` examples of a split (for tokenizer training)."""
  for i in range(num_examples):
    yield report(seed, split, i)


def qa_pairs(split: str, num_examples: int, seed: int = 0) -> Iterator[dict]:
  """All `questions` of the first `num_examples` images, each with the image's "index"."""
  for i in range(num_examples):
    for qa in questions(sample_case(seed, split, i)):
      yield {"index": i, **qa}
