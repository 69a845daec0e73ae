"""One TFDS builder per dataset (ArrayRecord output), looked up by the short names of `mpma-data`."""
import importlib
import re

import tensorflow_datasets as tfds

# short name -> (module, class), modules imported on demand. Your own dataset: add its builder class
# (or a (dotted module path, class name) pair) here or in your launcher.
BUILDERS = {
    "synthetic": ("synthetic", "Synthetic"),
    "synthetic_vqa": ("synthetic_downstream", "SyntheticVqa"),
    "synthetic_cls": ("synthetic_downstream", "SyntheticCls"),
    "synthetic_chest": ("synthetic_downstream", "SyntheticChest"),
    "roco": ("roco", "Roco"),
    "rocov2": ("roco", "Rocov2"),
    "roco_retrieval": ("roco", "RocoRetrieval"),
    "medicat": ("medicat", "Medicat"),
    "mimic_cxr": ("mimic_cxr", "MimicCxr"),
    "vqa_rad": ("vqa_rad", "VqaRad"),
    "slake": ("slake", "Slake"),
    "vqa_med_2019": ("vqa_med_2019", "VqaMed2019"),
    "melinda": ("melinda", "Melinda"),
    "chexpert": ("chexpert", "Chexpert"),
    "rsna_pneumonia": ("rsna_pneumonia", "RsnaPneumonia"),
}


def get(name: str):
  """The builder class for a short dataset name; ValueError listing the names if unknown."""
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(BUILDERS))}")
  if isinstance(BUILDERS[name], type):
    return BUILDERS[name]
  module, cls = BUILDERS[name]
  path = module if "." in module else f"mpma_jax.data.builders.{module}"
  return getattr(importlib.import_module(path), cls)


def builder(name: str, data_dir: str, **kwargs):
  """An instance of the named builder reading/writing under data_dir. 'name/config' selects a
  builder config; generated sets accept any 'n<train>_e<eval>_s<size>_seed<seed>'."""
  name, _, config_name = name.partition("/")
  cls = get(name)
  if config_name:
    kwargs["config"] = _config(cls, config_name)
  return cls(data_dir=data_dir, **kwargs)


def _config(cls, config_name: str):
  if config_name in {c.name for c in cls.BUILDER_CONFIGS}:
    return config_name
  match = re.fullmatch(r"n(\d+)_e(\d+)_s(\d+)_seed(\d+)", config_name)
  if not cls.GENERATED or not match:
    raise ValueError(f"{cls.__name__} has no config {config_name!r}; it has "
                     f"{[c.name for c in cls.BUILDER_CONFIGS]}")
  return importlib.import_module(cls.__module__).config_for(*map(int, match.groups()))


def build(name: str, manual_dir: str, data_dir: str, **kwargs):
  """Builds (or reuses) the named dataset as ArrayRecord; returns (builder, report).

  report: {split: {"written": n, "skipped": {reason: count}}}, also saved as build_report.json.
  """

  from mpma_jax.data.builders import base  # noqa  pylint: disable=g-import-not-at-top
  b = builder(name, data_dir, **kwargs)
  if b.is_prepared():
    return b, base.read_report(b) or b.report()
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  report = b.report()
  base.write_report(b, report)
  return b, report
