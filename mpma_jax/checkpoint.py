"""Checkpoints of every command, in one place: the pre-training state (`Checkpointer`), a
pre-training run read back for fine-tuning, export and pictures (`run_config`, `restore_params`,
`load_init`), and a fine-tuning run's best parameters (`BestCheckpoint`). All of them Orbax."""
import json
import os
from typing import Any, Optional

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


class NonFiniteLossError(FloatingPointError):
  """Non-finite steps stopped the run (train.nonfinite, train.max_nonfinite_*), or a state that
  is not finite was about to be checkpointed."""


def all_finite(tree) -> jax.Array:
  """bool []: every floating-point leaf of `tree` is finite (one reduction per leaf)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all() if leaves else jnp.array(True)


class CorruptCheckpointError(RuntimeError):
  """A checkpoint that cannot be read, or whose arrays differ from their checksums at save time;
  the message is one line naming the step, the path and what is wrong."""


# Checksums: per array, the wrapping uint32 sum of its bits times a position-dependent odd weight
# (a flipped bit, a changed value or two swapped elements change it). Integer sums are exact in any
# order, so the figure does not depend on the mesh or on how XLA splits the reduction.
_GOLDEN = 2654435761  # Knuth's multiplicative hash constant (odd)


def _array_checksum(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  index = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
  for axis in range(1, x.ndim):  # the element's flat (row-major) index
    index = index * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
  weight = index * jnp.uint32(_GOLDEN) + jnp.uint32(1)
  return jnp.sum(bits * weight, dtype=jnp.uint32)


def _checksum_stack(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.stack([_array_checksum(x) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)


_checksums = jax.jit(_checksum_stack)
# Checkpointer.save: finiteness and checksums in one pass over the state.
_finite_and_checksums = jax.jit(lambda tree: (all_finite(tree), _checksum_stack(tree)))


def _by_path(tree: Any, values: jax.Array) -> dict[str, int]:
  """The per-leaf figures of `_checksum_stack` keyed by each array's path in `tree`."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  if not values.is_fully_addressable:  # replicated: every process holds all of it
    values = values.addressable_data(0)
  return dict(zip(paths, (int(v) for v in np.asarray(jax.device_get(values)))))


def checksums(tree: Any) -> dict[str, int]:
  """{array path: checksum} of every array in `tree` (device arrays, sharded over any mesh and any
  number of processes, or host arrays)."""
  return _by_path(tree, _checksums(tree))


def abstract_like(state: Any) -> Any:
  """Shapes, dtypes and shardings of a live state: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# --- pre-training ---------------------------------------------------------------------------------
class Checkpointer:
  """Orbax CheckpointManager for the train state (step, params, optimizer state, RNG) and the Grain
  iterator state, saved together under <directory>/<step>/.

  Saves are asynchronous (training goes on while the arrays are written) and atomic: Orbax writes
  into a temporary directory and renames it when complete, so a process killed mid-save leaves the
  previous checkpoint as the latest one; the temporary directory is removed on the next start. The
  iterator state is the same on every host (a batch counter, see pipeline.HostShare), so one JSON
  copy restores any number of hosts.

  `save` refuses a state that is not finite, so every checkpoint here is a good one and Orbax's
  rotation (train.keep_checkpoints) can only ever replace good checkpoints by newer good ones.

  Every save records the checksum of each array (<directory>/../checkpoint_checksums/<step>.json,
  written by process 0 from figures computed on the devices); `restore` recomputes them and raises
  CorruptCheckpointError, naming the step, the path and the arrays, when a file was damaged, cut
  short or removed.
  """
  def __init__(self, directory: str, config: ml_collections.ConfigDict):
    self.directory = os.path.abspath(directory)
    self.checksum_dir = os.path.join(os.path.dirname(self.directory), "checkpoint_checksums")
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                             enable_async_checkpointing=config.train.ckpt_async,
                                             cleanup_tmp_directories=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator) -> None:
    finite, values = _finite_and_checksums(state)
    if not finite:
      latest = self.latest_step()
      raise NonFiniteLossError(
          f"refusing to checkpoint step {step}: the train state is not finite; " +
          (f"the last good checkpoint is step {latest}"
           if latest is not None else "there is no checkpoint yet"))
    sums = _by_path(state, values)  # taken before the save: the next step reuses the buffers
    self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_iterator.get_state())))
    if jax.process_index() == 0:
      os.makedirs(self.checksum_dir, exist_ok=True)
      with open(os.path.join(self.checksum_dir, f"{step}.json.tmp"), "w") as f:
        json.dump({"step": step, "checksums": sums}, f)
      os.replace(os.path.join(self.checksum_dir, f"{step}.json.tmp"),
                 os.path.join(self.checksum_dir, f"{step}.json"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """The state saved at `step`, laid out as `abstract_state` says and checked against its
    checksums; the data iterator (when given) is then set to continue where that step left off.
    CorruptCheckpointError when the checkpoint cannot be read or does not match."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = ocp.args.JsonRestore()
    where = f"checkpoint step {step} ({self.step_path(step)})"
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # Orbax / TensorStore: a file missing, cut short or unparseable
      raise CorruptCheckpointError(f"{where} cannot be read: {_first_line(e)}") from e
    verify(restored["state"], os.path.join(self.checksum_dir, f"{step}.json"), where)
    if data_iterator is not None:
      data_iterator.set_state(restored["data"])
    return restored["state"]

  def set_aside(self, step: int) -> str:
    """Moves a damaged checkpoint out of the way (never deleting it), so that training from an
    earlier one can save that step again; returns where it went."""
    self.manager.wait_until_finished()
    target = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints", str(step))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if jax.process_index() == 0:
      os.replace(self.step_path(step), target)
    self.manager.reload()
    return target

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


def verify(tree: Any, checksum_file: str, where: str) -> None:
  """Raises CorruptCheckpointError when an array of `tree` differs from its checksum recorded in
  checksum_file (arrays not recorded there are not checked; no file: nothing to check)."""
  if not os.path.exists(checksum_file):
    return
  with open(checksum_file) as f:
    want = json.load(f)["checksums"]
  got = checksums(tree)
  bad = [path for path, value in got.items() if path in want and want[path] != value]
  if bad:
    raise CorruptCheckpointError(
        f"{where}: {len(bad)} of {len(got)} arrays differ from their checksums at save time "
        f"(e.g. {bad[0]}); the files were changed after the save")


def latest_step(directory: str) -> Optional[int]:
  """The newest complete checkpoint's step in `directory` (<step>/ subdirectories; Orbax's
  temporary ones do not count), or None; reads only, creates nothing."""
  path = epath.Path(directory)  # local or gs://
  if not path.is_dir():
    return None
  return max((int(p.name) for p in path.iterdir() if p.name.isdigit()), default=None)


# --- a pre-training run, read back ----------------------------------------------------------------
# The pre-training config's format_version, and what each version added (with the value that
# reproduces a config of the version before): version 1 configs have no format_version.
CONFIG_FORMAT = 3
ADDED_IN_FORMAT = {  # format -> {field: the value that keeps an older config's behaviour}
    2: {
        "model.scan": False, "model.mim.activation": "gelu", "model.mim.eps": 1e-6,
        "train.ckpt_fallback": True
    },
    3: {
        "model.image.pos_resize": "jax_bicubic", "model.mim.target_var_unbiased": False,
        "masking.paired": True, "init.text_mlm_head": True,
        "model.mlm.eps": lambda config: config.model.text.eps  # (was tied to the text encoder's)
    },
}


def upgrade_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A saved pre-training config brought to CONFIG_FORMAT in place (the fields added since its
  format, at the values that keep its behaviour); ValueError for a format newer than this code."""
  version = config.get("format_version", 1)
  if version > CONFIG_FORMAT:
    raise ValueError(f"config format_version {version} is newer than this mpma_jax reads "
                     f"({CONFIG_FORMAT}); upgrade mpma_jax")
  for newer in range(version + 1, CONFIG_FORMAT + 1):
    for dotted, value in ADDED_IN_FORMAT[newer].items():
      *parents, leaf = dotted.split(".")
      node = config
      for part in parents:
        if part not in node:  # a section added in this format
          node[part] = ml_collections.ConfigDict()
        node = node[part]
      if leaf not in node:
        node[leaf] = value(config) if callable(value) else value
  config.format_version = CONFIG_FORMAT
  return config


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run was started with (<workdir>/config.json, written by mpma-pretrain), in
  the current format (`upgrade_config`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} an mpma-pretrain run directory?")
  with open(path) as f:
    return upgrade_config(ml_collections.ConfigDict(json.load(f)))


def restore_params(workdir: str, step: Optional[int] = None) -> tuple[Any, int]:
  """(parameters as host numpy arrays, step) of a run's checkpoint, on whatever devices are here.
  Only the train state is read; both items get their handler so that Orbax can read the step's
  metadata without warning about the one left alone (the data iterator's)."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  manager = ocp.CheckpointManager(
      directory, item_names=("state", "data"),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  step = manager.latest_step() if step is None else step
  if step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {directory}; there are {sorted(steps)}")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        manager.item_metadata(step)["state"])
  where = f"checkpoint step {step} ({directory}/{step})"
  try:
    restored = manager.restore(step,
                               args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except Exception as e:  # Orbax / TensorStore: a file missing, cut short or unparseable
    raise CorruptCheckpointError(f"{where} cannot be read: {_first_line(e)}") from e
  finally:
    manager.close()
  verify(restored["state"], os.path.join(workdir, "checkpoint_checksums", f"{step}.json"), where)
  return jax.tree.map(np.asarray, restored["state"]["params"]), step


def resolve_init(path: str) -> tuple[str, Optional[int]]:
  """A pre-training run directory (its latest checkpoint) or one checkpoint directory
  RUN/checkpoints/<step> -> (run directory, step or None)."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "config.json")):
    return path, None
  parent = os.path.dirname(path)
  if os.path.basename(parent) == "checkpoints" and os.path.basename(path).isdigit():
    return os.path.dirname(parent), int(os.path.basename(path))
  raise FileNotFoundError(f"--init {path!r} is neither an mpma-pretrain run directory (with "
                          "config.json) nor a checkpoint directory RUN/checkpoints/<step>")


def load_init(path: str) -> tuple[ml_collections.ConfigDict, Any, int, str]:
  """`resolve_init(path)` read: (pre-training config, its parameters as host arrays, step,
  tokenizer directory)."""
  run_dir, step = resolve_init(path)
  config = run_config(run_dir)
  params, step = restore_params(run_dir, step)
  tokenizer_dir = os.path.join(run_dir, "tokenizer")
  if not os.path.isdir(tokenizer_dir):
    raise FileNotFoundError(f"{tokenizer_dir} is missing: the run's tokenizer is needed to encode "
                            "the downstream texts with the ids the model was trained on")
  return config, params, step, tokenizer_dir


# --- fine-tuning ----------------------------------------------------------------------------------
class BestCheckpoint:
  """A fine-tuning protocol's checkpoints/: the parameters of the epoch with the best selection
  metric (higher is better), the only one kept."""
  def __init__(self, directory: str, metric: str):
    self.metric = metric
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m[metric],
                                             best_mode="max", enable_async_checkpointing=False))

  def save(self, epoch: int, params: Any, value: float) -> None:
    self.manager.save(epoch, args=ocp.args.StandardSave(params), metrics={self.metric: value})

  def restore_best(self, params: Any) -> tuple[Any, int]:
    """(the best epoch's parameters, laid out like `params`, that epoch); closes the manager."""
    best = self.manager.best_step()
    self.manager.wait_until_finished()
    restored = self.manager.restore(best, args=ocp.args.StandardRestore(abstract_like(params)))
    self.manager.close()
    return restored, best


def restore_selected(directory: str, target: Any) -> tuple[Any, int]:
  """(parameters, epoch) of the checkpoint a fine-tuning protocol kept in `directory` (its only
  one), laid out as the abstract `target` says."""
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  params = manager.restore(step, args=ocp.args.StandardRestore(target))
  manager.close()
  return params, step
