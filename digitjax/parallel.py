"""Data parallelism with JAX's own machinery: one mesh axis 'data', replicated state.

The global batch is split along 'data'; on many hosts each process feeds only its own rows and
`jax.make_array_from_process_local_data` assembles the global array.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from digitjax.errors import UserError


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: the compiler propagates shardings, so model code stays sharding-agnostic.
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_divisible(name: str, size: int, mesh) -> None:
  n = mesh.devices.size
  if size % n:
    raise UserError(f'{name}={size} is not divisible by the {n} devices; pick a multiple of {n}')


def to_global(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays sharded along 'data'."""
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def is_main_process() -> bool:
  return jax.process_index() == 0
