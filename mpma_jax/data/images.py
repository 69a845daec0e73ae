"""Image decoding: encoded bytes (JPEG, PNG 8/16-bit, any PIL mode, DICOM) -> RGB uint8 -> resized
and centre-cropped to the model's size. CLIP mean/std normalisation happens on device
(`models.vit.normalize_images`); `normalize` here is the same map in NumPy for host-side use.

Every failure is an `ImageError` whose message says what is wrong, so builders and the input
pipeline can skip the example and count the reason.
"""
import io

import numpy as np
from PIL import Image
import pydicom
from pydicom import pixels

from mpma_jax.constants import CLIP_MEAN, CLIP_STD

# Refuse decompression bombs but allow large radiographs (MIMIC-CXR JPGs are ~3000 x 3000).
Image.MAX_IMAGE_PIXELS = 20_000**2


class ImageError(ValueError):
  """An image that cannot be used; `reason` is the short counter key ('unreadable image', ...)."""
  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def is_dicom(data: bytes) -> bool:
  """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
  return len(data) >= 132 and data[128:132] == b"DICM"


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
  """Min-max scales a high-bit-depth or float grey image to uint8 (constant images -> 0)."""
  x = pixels.astype(np.float64)
  lo, hi = np.nanmin(x), np.nanmax(x)
  if not np.isfinite(lo) or hi <= lo:
    return np.zeros(x.shape, np.uint8)
  return np.round((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[..., None], 3, axis=-1)  # [H, W, 3]


def decode_dicom(data: bytes) -> np.ndarray:
  """DICOM -> RGB uint8 [H, W, 3]. Colour: as decoded (YBR is converted to RGB by pydicom),
  palettes applied. Grey: modality LUT (rescale), the file's VOI window if it has one (else
  min-max), MONOCHROME1 inverted so that bone is bright. First frame of multi-frame files."""
  try:
    ds = pydicom.dcmread(io.BytesIO(data))
    arr = ds.pixel_array  # pydicom >= 3 returns YBR_FULL(_422) already as RGB: do not convert again
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
      arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
      arr = pixels.apply_color_lut(arr, ds)
    if arr.ndim == 3:
      return arr if arr.dtype == np.uint8 else _to_uint8(arr)
    x = pixels.apply_modality_lut(arr, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
      x = pixels.apply_voi_lut(x, ds)
  except Exception as e:  # pydicom raises many types (missing pixel data, codecs, truncation,
    # invalid LUT or window values): all mean the file cannot be used
    raise ImageError("unreadable image", f"DICOM: {e}") from e
  grey = _to_uint8(x)
  if photometric == "MONOCHROME1":
    grey = 255 - grey
  return _grey_to_rgb(grey)


def decode(data: bytes) -> np.ndarray:
  """Encoded image bytes -> RGB uint8 [H, W, 3]. Raises ImageError."""
  if not data:
    raise ImageError("empty image file")
  if is_dicom(data):
    return decode_dicom(data)
  try:
    img = Image.open(io.BytesIO(data))
    img.load()  # forces a full decode: truncated files fail here, not later
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
    raise ImageError("unreadable image", str(e)) from e
  if img.width == 0 or img.height == 0:
    raise ImageError("zero-size image", f"{img.width}x{img.height}")
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit PNG / TIFF, float
    return _grey_to_rgb(_to_uint8(np.asarray(img)))
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    img = img.convert("RGBA")
    background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent -> black
    img = Image.alpha_composite(background, img)
  return np.asarray(img.convert("RGB"))


def resize_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize of the shorter side to `size`, then a centre crop -> uint8 [size, size, 3]."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  img = Image.fromarray(image).resize((nw, nh), Image.BICUBIC)
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)))


def load(data: bytes, size: int) -> np.ndarray:
  """Encoded bytes -> RGB uint8 [size, size, 3] (decode, resize, crop). Raises ImageError."""
  img = decode(data)
  if img.shape[0] == 0 or img.shape[1] == 0:
    raise ImageError("zero-size image", f"{img.shape}")
  return resize_crop(img, size)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> CLIP-normalised float32 (the same map as models.vit.normalize_images)."""
  return (image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W] or [H, W, 3] -> PNG bytes (used by the synthetic builder and tests)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()
