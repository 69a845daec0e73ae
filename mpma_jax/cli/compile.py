"""mpma-compile: compile the real train step for a TPU/GPU topology on this machine, and say whether
it fits, what it communicates and how fast it should run, before anyone books the hardware.

  mpma-compile --config configs/pretrain.py:base --topology v5e:4x4 --config.model.scan=True
  mpma-compile --config configs/pretrain.py:base --topology v5e:16x16 --suggest
  mpma-compile --config configs/pretrain.py:tiny --topology cpu:8

Prints a summary and writes the full report as JSON (--json). --suggest searches the mesh shape,
model.remat, train.grad_accum (hence the micro-batch) for the config's global batch, compiles each
setting it tries, and lists those that fit, fastest first (aot.suggest).
"""
import json
import os
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from mpma_jax import aot, cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pre-training config, e.g. configs/pretrain.py:base (--config.* overrides)",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Target: v5e:4x4, v5e:16x16, v5p:4x4x4, v4:2x2x4, v6e:4x4, cpu:8, h100:8")
_SUGGEST = flags.DEFINE_bool(
    "suggest", False, "Search mesh / remat / grad_accum for settings "
    "that fit the topology, and rank them by the estimated step time")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 6, "--suggest: most settings compiled")
_MAX_FITS = flags.DEFINE_integer(
    "max_fits", 0, "--suggest: stop once this many settings fit "
    "(0: search until --max_compiles)")
_HLO = flags.DEFINE_string("hlo", "", "Also write the compiled HLO text here")
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib", 0.0, "Memory per device to fit in, GiB (default: the "
    "chip's HBM; lower it to keep headroom)")
_JSON = flags.DEFINE_string(
    "json", "", "Where to write the JSON report (default: "
    "compile_<variant>_<topology>.json in the current directory)")
_SAVE = flags.DEFINE_string(
    "save", "", "Also write the serialized executable here (load it on the "
    "target with aot.load_executable instead of compiling)")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)
  config, topology = _CONFIG.value, _TOPOLOGY.value
  if _SAVE.value:
    # An executable read back from the persistent compilation cache (JAX_COMPILATION_CACHE_DIR)
    # serializes without its compiled functions on XLA:CPU ("Function ... not found" when the saved
    # file runs): compile afresh. Set before the first compile, as JAX decides it once per process.
    jax.config.update("jax_enable_compilation_cache", False)
  try:
    devices = aot.target_devices(topology)
  except ValueError as e:
    print(f"mpma-compile: {e}", file=sys.stderr)
    sys.exit(2)
  if _SUGGEST.value:
    result = aot.suggest(config, topology, devices, max_compiles=_MAX_COMPILES.value,
                         hbm_bytes=_HBM_GIB.value * aot.GiB, max_fits=_MAX_FITS.value,
                         log=lambda line: print(line, flush=True))
    print(aot.format_suggestions(result))
  else:
    try:
      compiled = aot.compile_step(config, topology, devices)
    except ValueError as e:  # a mesh that does not fit the devices, a bad config value
      print(f"mpma-compile: {e}", file=sys.stderr)
      sys.exit(2)
    result = aot.report(config, compiled, _HBM_GIB.value * aot.GiB)
    print(aot.format_report(result))
    if _HLO.value:
      with open(_HLO.value, "w") as f:
        f.write(compiled.executable.as_text())
    if _SAVE.value:
      aot.save_executable(compiled.executable, _SAVE.value)
      print(f"executable: {_SAVE.value}")
  path = _JSON.value or f"compile_{config.get('variant', 'config')}_{topology.replace(':', '-')}.json"
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"report: {os.path.abspath(path)}")


def run():
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
