"""Parallelism with JAX's own machinery: a mesh with axes ('members', 'data').

'data' splits each global batch (the train state replicated along it); on many hosts each
process feeds only its own rows and `jax.make_array_from_process_local_data` assembles the
global array. 'members' holds the members of a vmapped population group, each on its own
devices, with no communication between them. A population of several members split over
processes gives each process a mesh of its own devices only (`local=True`): its members then
never wait for another process.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from digitjax.errors import UserError


def initialize_distributed(dist) -> None:
  """Joins a multi-process run when the config or the environment asks for one.

  `dist.coordinator_address` etc. come from config (or stay unset, and then JAX reads the
  standard environment: TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS...). Must run before
  anything touches the devices. On CPU, collectives between processes go through gloo.
  """
  if dist.mode == 'off' or (dist.mode == 'auto' and not _cluster_detected(dist)):
    return
  if dist.cpu_collectives:  # only the CPU backend reads it
    jax.config.update('jax_cpu_collectives_implementation', dist.cpu_collectives)
  kwargs = {}
  if dist.coordinator_address:
    kwargs['coordinator_address'] = dist.coordinator_address
  if dist.num_processes:
    kwargs['num_processes'] = dist.num_processes
  if dist.process_id >= 0:
    kwargs['process_id'] = dist.process_id
  if dist.initialization_timeout:
    kwargs['initialization_timeout'] = dist.initialization_timeout
  jax.distributed.initialize(**kwargs)


def _cluster_detected(dist) -> bool:
  import os
  markers = ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
             'MEGASCALE_COORDINATOR_ADDRESS')
  return bool(dist.coordinator_address) or any(m in os.environ for m in markers)


def make_mesh(local: bool = False, members: int = 1, devices=None) -> jax.sharding.Mesh:
  """All devices (or this process's, `local`, or `devices`) as a (members, data) mesh."""
  if devices is None:
    devices = jax.local_devices() if local else jax.devices()
  devices = np.asarray(devices).reshape(members, -1)
  # Auto axes: the compiler propagates shardings, so model code stays sharding-agnostic.
  return jax.sharding.Mesh(devices, ('members', 'data'),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)


def is_local(mesh) -> bool:
  """Whether every device of `mesh` belongs to this process."""
  return all(d.process_index == jax.process_index() for d in mesh.devices.flat)


def share(mesh) -> tuple[int, int]:
  """(index, count): this process's share of a global batch on `mesh`."""
  return (0, 1) if is_local(mesh) else (jax.process_index(), jax.process_count())


def data_size(mesh) -> int:
  return mesh.shape['data']


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def member_sharding(mesh, batch: bool = False) -> NamedSharding:
  """A group's stacked arrays: the leading member axis over 'members' (and a batch axis after
  it over 'data')."""
  return NamedSharding(mesh, P('members', 'data') if batch else P('members'))


def check_cpu_layout(allow_several_cpu_devices: bool) -> None:
  """Refuses several CPU devices in one process, which hang in XLA's in-process all-reduce.

  Seen here with jax 0.10.2 on 2 cores (--xla_force_host_platform_device_count=2): the first
  data-parallel steps stall at an all-reduce rendezvous and XLA aborts the process after 40 s,
  even with a single all-reduce per step. One process per CPU device (jax.distributed, gloo) works.
  """
  if (jax.default_backend() == 'cpu' and jax.local_device_count() > 1
      and not allow_several_cpu_devices):
    raise UserError(f'{jax.local_device_count()} CPU devices in one process deadlock in XLA\'s '
                    f'all-reduce; run one process per device with jax.distributed (README), or '
                    f'set config.distributed.allow_several_cpu_devices=True to try anyway')


def check_divisible(name: str, size: int, mesh) -> None:
  n = data_size(mesh)
  if size % n:
    raise UserError(f'{name}={size} is not divisible by the {n} devices; pick a multiple of {n}')


def to_global(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays sharded along 'data'."""
  if jax.process_count() == 1 or is_local(sharding.mesh):
    return jax.device_put(local_batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def is_main_process() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any of them (one small collective)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
