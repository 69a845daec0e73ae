"""Device mesh and the logical -> mesh axis rules (config.mesh).

The model only names logical axes; this module turns the config's rule table into shardings, so
data parallelism, FSDP and tensor parallelism are a config change.
"""
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over both, fsdp-major. Not ("data", "fsdp"): with that order XLA's
# SPMD partitioner (jaxlib 0.10.2, Shardy and GSPMD alike) miscompiles a matmul on meshes with all
# three axes > 1 — x [B, T, F] (batch, -, tensor) @ w [F, D] (tensor, fsdp) with the result's D on
# tensor — by collective-permuting x's batch shards between devices without permuting them back,
# so some examples get other examples' activations (tests/test_sharding.py reproduces it). It
# happens only when the weight's split axis is the *minor* batch axis; weights are never split
# over 'data', so fsdp-major avoids it. The config's 'batch' rule must say the same (`rules`).
BATCH_AXES = ("fsdp", "data")


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes; at most one may be -1 (= all remaining devices)."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one of mesh.{{data,fsdp,tensor}} may be -1, got {sizes}")
  fixed = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
    raise ValueError(
        f"mesh (data, fsdp, tensor) = {tuple(sizes)} does not fit {num_devices} devices")
  sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh (data, fsdp, tensor) = {tuple(sizes)} uses {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axis types: Flax's logical partitioning expects the classic (non-explicit) behaviour.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def rules(mesh_config: ml_collections.ConfigDict) -> tuple:
  """The rule table as a tuple of (logical, mesh axes) pairs."""
  table = tuple(
      (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in mesh_config.rules)
  batch = dict(table).get("batch")
  if batch != BATCH_AXES:
    raise ValueError(f"mesh.rules maps 'batch' to {batch!r}, expected {BATCH_AXES!r}: activations "
                     "must be split like the input batch (sharding.batch_sharding), and the order "
                     "('data', 'fsdp') makes XLA miscompile on data x fsdp x tensor meshes "
                     "(see sharding.BATCH_AXES)")
  return table


def logical_shardings(boxed_tree: Any, mesh: Mesh, rule_table) -> Any:
  """NamedShardings for a tree whose leaves carry logical names (nn.LogicallyPartitioned)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rule_table)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This host's share of the batch (NumPy) -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in local_batch.items()
  }
