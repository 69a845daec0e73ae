"""Image decoding: every PIL format the datasets use, DICOM (real radiographs from pydicom's and
pydicom-data's test files, and files written here), failures as ImageError with a reason, the
resize + centre crop, and normalisation equal to the model's."""
import io

import numpy as np
from PIL import Image
import pydicom
from pydicom.data import get_testdata_file
import pytest

from mpma_jax.data import images


def _png(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements) -> bytes:
  """A DICOM Part 10 file (Explicit VR Little Endian) holding `pixels` (uint8 or uint16, [H, W]
  or [frames, H, W]) with extra data elements by keyword (WindowCenter=..., ...)."""
  meta = pydicom.dataset.FileMetaDataset()
  meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  ds = pydicom.Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientID = "CR", "test"
  ds.set_pixel_data(pixels, photometric, 8 * pixels.itemsize)
  for keyword, value in elements.items():
    setattr(ds, keyword, value)
  buf = io.BytesIO()
  ds.save_as(buf, enforce_file_format=True)
  return buf.getvalue()


def _window(x: np.ndarray, center: float, width: float) -> np.ndarray:
  """The DICOM LINEAR window (PS3.3 C.11.2.1.2) to [0, 1]."""
  return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _min_max(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  return np.round((x - x.min()) * 255.0 / (x.max() - x.min())).astype(np.uint8)


def _gradient(h=24, w=32) -> np.ndarray:
  y, x = np.mgrid[:h, :w]
  return np.stack([x * 255 // (w - 1), y * 255 //
                   (h - 1), np.full_like(x, 128)], -1).astype(np.uint8)


# --- PIL formats ---------------------------------------------------------------------------------
def test_jpeg_decodes_close_to_the_original():
  original = _gradient()
  out = images.decode(images.encode_jpeg(original, quality=95))
  assert out.shape == (24, 32, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - original).mean() < 3


def test_8bit_png_round_trips_exactly():
  original = _gradient()
  np.testing.assert_array_equal(images.decode(images.encode_png(original)), original)


def test_16bit_png_is_min_max_scaled_with_order_preserved():
  values = np.array([[1000, 1500, 4000], [30000, 30001, 60000]], np.uint16)
  img = Image.fromarray(values)
  assert img.mode == "I;16"
  out = images.decode(_png(img))
  assert out.shape == (2, 3, 3) and out.dtype == np.uint8
  grey = out[..., 0]
  np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
  assert grey.min() == 0 and grey.max() == 255
  assert grey[0, 0] == 0 and grey[1, 2] == 255
  flat = grey.ravel().astype(int)
  assert np.all(np.diff(flat) >= 0)  # values increase along the raster order, so must the output
  np.testing.assert_array_equal(grey, _min_max(values))


def test_grey_png_becomes_three_identical_channels():
  grey = (np.arange(48).reshape(6, 8) * 5).astype(np.uint8)
  out = images.decode(images.encode_png(grey))
  assert out.shape == (6, 8, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_transparent_pixels_become_black():
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., :3] = (200, 100, 50)
  rgba[:2, :, 3] = 255  # top half opaque
  rgba[2:, :, 3] = 0  # bottom half fully transparent
  rgba[3, 3, 3] = 128  # one half-transparent pixel: composited on black
  out = images.decode(_png(Image.fromarray(rgba, "RGBA")))
  assert out.shape == (4, 4, 3)
  assert np.all(out[:2] == (200, 100, 50))
  assert np.all(out[2, :] == 0) and np.all(out[3, :3] == 0)
  np.testing.assert_allclose(out[3, 3], np.array([200, 100, 50]) * 128 / 255, atol=1)


def test_palette_images_use_their_palette():
  indices = np.array([[0, 1], [2, 1]], np.uint8)
  img = Image.fromarray(indices, "P")
  img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
  out = images.decode(_png(img))
  np.testing.assert_array_equal(out, [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 255, 0]]])
  img.info["transparency"] = 1  # palette entry 1 transparent -> black
  out = images.decode(_png(img))
  np.testing.assert_array_equal(out, [[[255, 0, 0], [0, 0, 0]], [[0, 0, 255], [0, 0, 0]]])


@pytest.mark.parametrize(
    "data, reason",
    [
        (images.encode_jpeg(_gradient(64, 64))[:300], "unreadable image"),  # truncated JPEG
        (np.random.default_rng(0).bytes(2000), "unreadable image"),
        (b"", "empty image file"),
    ])
def test_bad_bytes_raise_image_error_with_a_reason(data, reason):
  with pytest.raises(images.ImageError) as e:
    images.decode(data)
  assert e.value.reason == reason
  with pytest.raises(images.ImageError):
    images.load(data, 16)


# --- resize, crop, normalise ---------------------------------------------------------------------
def test_resize_crop_keeps_the_centre_of_a_wide_image():
  wide = np.zeros((20, 60, 3), np.uint8)
  wide[:, 30:] = 255  # left half black, right half white
  out = images.resize_crop(wide, 10)
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  # shorter side 20 -> 10, width 60 -> 30, crop columns 10..19: the edge is in the middle
  assert np.all(out[:, :4] < 10) and np.all(out[:, 6:] > 245)
  thirds = np.zeros((20, 60, 3), np.uint8)
  thirds[:, 20:40] = 128
  thirds[:, 40:] = 255  # only the grey middle third survives the crop
  assert np.all(np.abs(images.resize_crop(thirds, 10)[:, 1:-1].astype(int) - 128) <= 2)


def test_resize_crop_keeps_the_centre_of_a_tall_image():
  tall = np.zeros((60, 20, 3), np.uint8)
  tall[30:] = 255
  out = images.resize_crop(tall, 10)
  assert out.shape == (10, 10, 3)
  assert np.all(out[:4] < 10) and np.all(out[6:] > 245)


def test_resize_crop_upsamples_small_images_and_keeps_exact_sizes():
  small = np.full((4, 6, 3), 77, np.uint8)
  out = images.resize_crop(small, 16)
  assert out.shape == (16, 16, 3) and np.all(out == 77)
  same = _gradient(16, 16)
  assert images.resize_crop(same, 16) is same
  assert images.load(images.encode_png(_gradient(7, 3)), 32).shape == (32, 32, 3)


def test_normalize_matches_the_models_normalisation():
  from mpma_jax.models import vit
  x = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  out = images.normalize(x)
  assert out.dtype == np.float32 and out.shape == x.shape
  np.testing.assert_allclose(out, np.asarray(vit.normalize_images(x)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(images.normalize(np.zeros(3, np.uint8)),
                             -np.asarray(vit.CLIP_MEAN) / np.asarray(vit.CLIP_STD), rtol=1e-6)


# --- DICOM ---------------------------------------------------------------------------------------
def test_real_monochrome1_chest_radiograph():
  path = get_testdata_file("RG1_UNCI.dcm")  # pydicom-data: a real PA chest radiograph
  data = open(path, "rb").read()
  assert images.is_dicom(data)
  ds = pydicom.dcmread(path)
  assert ds.PhotometricInterpretation == "MONOCHROME1" and "WindowCenter" in ds
  out = images.decode(data)
  assert out.shape == (ds.Rows, ds.Columns, 3) and out.dtype == np.uint8
  # the file's window, min-max, then inverted: MONOCHROME1 stores bone dark
  windowed = _window(ds.pixel_array.astype(np.float64), float(ds.WindowCenter),
                     float(ds.WindowWidth))
  expected = 255 - _min_max(windowed)
  assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
  # the same pixels read as MONOCHROME2 give the exact negative
  ds.PhotometricInterpretation = "MONOCHROME2"
  buf = io.BytesIO()
  ds.save_as(buf)
  np.testing.assert_array_equal(out.astype(int) + images.decode(buf.getvalue()), 255)

  small = images.load(data, 288)
  assert small.shape == (288, 288, 3) and small.dtype == np.uint8
  assert small.min() < 20 and small.max() > 235 and small.std() > 25
  grey = small[..., 0].astype(float)
  lungs = np.r_[grey[80:160, 60:100].ravel(), grey[80:160, 190:230].ravel()].mean()
  spine = grey[80:160, 136:152].mean()
  assert spine > lungs + 40  # displayed the right way round: bone bright, lungs dark


def test_pydicom_ct_without_window_is_min_max_scaled():
  path = get_testdata_file("CT_small.dcm")
  ds = pydicom.dcmread(path)
  assert ds.PhotometricInterpretation == "MONOCHROME2" and "WindowCenter" not in ds
  out = images.decode(open(path, "rb").read())
  assert out.shape == (128, 128, 3)
  # the rescale (slope 1, intercept -1024) is affine, so min-max of the raw pixels is the same
  np.testing.assert_array_equal(out[..., 0], _min_max(ds.pixel_array))
  assert images.load(open(path, "rb").read(), 32).shape == (32, 32, 3)


def test_pydicom_mr_decodes_with_its_window():
  path = get_testdata_file("MR_small.dcm")
  ds = pydicom.dcmread(path)
  out = images.decode(open(path, "rb").read())
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  expected = _min_max(
      _window(ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth)))
  assert np.abs(out[..., 0].astype(int) - expected).max() <= 1


def test_pydicom_ybr_colour_is_converted_to_rgb_once():
  path = get_testdata_file("SC_ybr_full_422_uncompressed.dcm")  # red, green, blue... stripes
  out = images.decode(open(path, "rb").read())
  rgb = pydicom.dcmread(path).pixel_array  # pydicom 3 already converts YBR to RGB
  np.testing.assert_array_equal(out, rgb)
  assert tuple(out[0, 0]) == (254, 0, 0)


RAMP = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 100)  # 0 .. 1500


def test_written_dicom_monochrome2_and_monochrome1_without_window():
  m2 = images.decode(dicom_bytes(RAMP, "MONOCHROME2"))
  m1 = images.decode(dicom_bytes(RAMP, "MONOCHROME1"))
  np.testing.assert_array_equal(m2[..., 0], _min_max(RAMP))
  np.testing.assert_array_equal(m1[..., 0], 255 - _min_max(RAMP))
  assert m2[0, 0, 0] == 0 and m2[3, 3, 0] == 255 and m1[0, 0, 0] == 255
  for c in (1, 2):
    np.testing.assert_array_equal(m2[..., c], m2[..., 0])


def test_written_dicom_with_a_window():
  # pixels at or below 250 and above 749 saturate; between, the LINEAR window (300 -> 26)
  m2 = images.decode(dicom_bytes(RAMP, "MONOCHROME2", WindowCenter=500, WindowWidth=501))
  expected = np.round(_window(RAMP.astype(float), 500, 501) * 255).astype(np.uint8)
  np.testing.assert_array_equal(m2[..., 0], expected)
  assert list(m2[0, :4, 0]) == [0, 0, 0, 26] and m2[2, 0, 0] == 255
  m1 = images.decode(dicom_bytes(RAMP, "MONOCHROME1", WindowCenter=500, WindowWidth=501))
  np.testing.assert_array_equal(m1, 255 - m2)


def test_written_dicom_8bit_multiframe_and_rescale():
  frames = np.stack([np.arange(12, dtype=np.uint8).reshape(3, 4), np.zeros((3, 4), np.uint8)])
  out = images.decode(dicom_bytes(frames, "MONOCHROME2"))
  np.testing.assert_array_equal(out[..., 0], _min_max(frames[0]))  # the first frame
  # a rescale with negative slope flips the order before min-max
  out = images.decode(dicom_bytes(RAMP, RescaleSlope=-1, RescaleIntercept=0))
  np.testing.assert_array_equal(out[..., 0], 255 - _min_max(RAMP))


def test_broken_dicoms_raise_image_error():
  data = dicom_bytes(RAMP)
  for broken in (
      data[:len(data) - 20],  # truncated pixel data
      dicom_bytes(RAMP, WindowCenter=500, WindowWidth=0)):  # invalid window
    with pytest.raises(images.ImageError) as e:
      images.decode(broken)
    assert e.value.reason == "unreadable image"
  no_pixels = pydicom.dcmread(io.BytesIO(data))
  del no_pixels.PixelData
  buf = io.BytesIO()
  no_pixels.save_as(buf)
  with pytest.raises(images.ImageError, match="unreadable image"):
    images.decode(buf.getvalue())
