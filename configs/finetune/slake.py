"""SLAKE (English questions): answer classification; open / closed / overall accuracy. Has an
official validation split, used for model selection by both protocols."""
import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config():
  c = common["base"]("vqa", "slake")
  c.train.epochs = 15  # [M3AE]
  c.train.batch_size = 32  # [M3AE]
  return c
