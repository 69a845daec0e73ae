"""One TFDS builder per dataset (ArrayRecord output), looked up by the short names of `mpma-data`."""
import importlib
import os
import re
import shutil

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


def build(name: str, manual_dir: str, data_dir: str, overwrite: bool = False, **kwargs):
  """Builds (or reuses) the named dataset as ArrayRecord; returns (builder, report).

  report: {split: {"written": n, "skipped": {reason: count}}}, also saved as build_report.json
  with a listing of the files read from manual_dir. A dataset already built in data_dir is reused
  (`builder.status` = "reused") when manual_dir holds the same files as when it was built; if they
  differ, ValueError names what changed, unless overwrite=True, which builds it again.
  """
  from mpma_jax.data.builders import base  # noqa  pylint: disable=g-import-not-at-top
  b = builder(name, data_dir, **kwargs)
  source = None if b.GENERATED else base.source_listing(manual_dir)
  if b.is_prepared() and not overwrite:
    record = base.read_build_record(b) or {}
    built_from = base.read_source_listing(b)
    if source is not None and built_from is not None:
      changes = base.source_changes(built_from, source["files"])
      if changes:
        was = record.get("manual_dir", "?")
        where = (f"from another manual_dir ({was!r})"
                 if was != source["manual_dir"] else "and its manual_dir has changed since")
        raise ValueError(f"{name} is already built in {os.fspath(b.data_dir)!r} {where}: "
                         f"{changes}; build again with --overwrite (or use another --data_dir)")
    b.status = "reused"
    b.across_splits.update(record.get("duplicates_across_splits", {}))
    return b, record.get("splits") or b.report()
  if b.is_prepared():  # overwrite: this version's folder only
    shutil.rmtree(os.fspath(b.data_dir))
    b = builder(name, data_dir, **kwargs)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  b.status = "built"
  report = b.report()
  base.write_report(b, report, source)
  return b, report
