"""Parallelism with JAX's own machinery: a mesh with axes ('members', 'data').

'data' splits each global batch (the train state replicated along it); on many hosts each
process feeds only its own rows and `jax.make_array_from_process_local_data` assembles the
global array. 'members' holds the members of a vmapped population group, each on its own
devices, with no communication between them. A population of several members split over
processes gives each process a mesh of its own devices only (`local=True`): its members then
never wait for another process.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from digitjax.errors import UserError


# configlib.DISTRIBUTED_MODES and CPU_COLLECTIVES (this layer cannot import configlib; launch.py
# joins before it validates the config): pinned equal by tests/test_config_checks.py.
DISTRIBUTED_MODES = ('auto', 'on', 'off')
CPU_COLLECTIVES = ('gloo', 'mpi', 'megascale', '')
# Managed clusters JAX reads its set-up from, each with the variables it needs (jax._src.clusters):
# one set without the rest is a half-set environment, refused rather than handed to JAX.
MANAGED_CLUSTERS = {
    'SLURM_JOB_ID': ('SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID'),
    'OMPI_COMM_WORLD_SIZE': ('OMPI_MCA_orte_hnp_uri',),
    'TPU_WORKER_HOSTNAMES': (),
    'MEGASCALE_COORDINATOR_ADDRESS': (),
}
_ALONE = "or set config.distributed.mode='off' to run as one process"


def initialize_distributed(dist, environ=None) -> None:
  """Joins a multi-process run when the config or the environment asks for one.

  `dist.coordinator_address` etc. come from config (or stay unset, and then JAX reads the
  standard environment: TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS...). Must run before
  anything touches the devices. On CPU, collectives between processes go through gloo. A bad
  field or a half-set environment is a UserError before JAX is asked to join anything.
  """
  kwargs = distributed_arguments(dist, os.environ if environ is None else environ)
  if kwargs is None:
    return
  if dist.cpu_collectives:  # only the CPU backend reads it
    jax.config.update('jax_cpu_collectives_implementation', dist.cpu_collectives)
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError, KeyError, RuntimeError) as e:
    text = ' '.join(str(e).split())[:200]
    raise UserError(f'could not join the multi-process run ({type(e).__name__}: {text}); check '
                    f'config.distributed and the cluster environment, {_ALONE}') from e


def distributed_arguments(dist, environ) -> dict | None:
  """jax.distributed.initialize's arguments for `dist` in `environ`; None to run alone."""
  _check_fields(dist)
  managed = [m for m in MANAGED_CLUSTERS if m in environ]
  address = dist.coordinator_address or environ.get('JAX_COORDINATOR_ADDRESS', '')
  # 'auto' is resolved here, not in configlib.resolve: it depends on the environment and must
  # be known before JAX starts (launch.py joins the cluster before anything else).
  if dist.mode == 'off' or (dist.mode == 'auto' and not (address or managed)):
    return None
  for marker in managed:
    missing = [v for v in MANAGED_CLUSTERS[marker] if v not in environ]
    if missing:
      raise UserError(f'config.distributed.mode={dist.mode!r}: {marker} is set but not '
                      f'{", ".join(missing)}, so JAX cannot join the cluster from it; start each '
                      f'process under the cluster\'s launcher (srun, mpirun), {_ALONE}')
  source = ('config.distributed.coordinator_address' if dist.coordinator_address else
            'JAX_COORDINATOR_ADDRESS')
  if address:
    _check_address(source, address)
  elif not managed:
    raise UserError(f"config.distributed.mode='on' but no coordinator: set config.distributed."
                    f"coordinator_address, num_processes and process_id (or run under Slurm, "
                    f"Open MPI or on a TPU pod), {_ALONE}")
  if address and not managed:  # nothing but the config can say how many and which
    said = f'{source}={address}'
    if not dist.num_processes:
      raise UserError(f'{said} is set but not the number of processes: set config.distributed.'
                      f'num_processes and process_id (no Slurm, Open MPI or TPU environment '
                      f'gives them), {_ALONE}')
    if dist.process_id < 0:
      raise UserError(f"{said} is set but not this process's id: set config.distributed."
                      f"process_id (0 to {dist.num_processes - 1}), {_ALONE}")
  return _arguments(dist)


def _arguments(dist) -> dict:
  kwargs = {}
  if dist.coordinator_address:
    kwargs['coordinator_address'] = dist.coordinator_address
  if dist.num_processes:
    kwargs['num_processes'] = dist.num_processes
  if dist.process_id >= 0:
    kwargs['process_id'] = dist.process_id
  if dist.initialization_timeout:
    kwargs['initialization_timeout'] = dist.initialization_timeout
  return kwargs


def _check_fields(dist) -> None:
  """The fields of config.distributed as configlib.validate checks them (in the same words)."""
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  checks = [
      ('mode', dist.mode in DISTRIBUTED_MODES, "'auto', 'on' or 'off'"),
      ('cpu_collectives', dist.cpu_collectives in CPU_COLLECTIVES,
       "'gloo', 'mpi', 'megascale' or '' (JAX's default)"),
      ('coordinator_address', isinstance(dist.coordinator_address, str),
       "'host:port' or '' (from the environment)"),
      ('num_processes', is_int(dist.num_processes) and dist.num_processes >= 0,
       '0 (from the environment) or positive'),
      ('process_id', is_int(dist.process_id) and dist.process_id >= -1,
       '-1 (from the environment) or an id >= 0'),
      ('initialization_timeout', is_int(dist.initialization_timeout)
       and dist.initialization_timeout > 0, 'a positive number of seconds'),
  ]
  for field, ok, expected in checks:
    if not ok:
      raise UserError(f'config.distributed.{field}={dist[field]!r} is invalid: it must be '
                      f'{expected}')
  if dist.num_processes and dist.process_id >= dist.num_processes:
    raise UserError(f'config.distributed.process_id={dist.process_id} is not below config.'
                    f'distributed.num_processes={dist.num_processes}: ids run from 0 to '
                    f'{dist.num_processes - 1}; {_ALONE}')


def _check_address(source: str, address: str) -> None:
  host, _, port = address.rpartition(':')
  if not (host and port.isdigit() and 0 < int(port) < 65536):
    raise UserError(f'{source}={address!r} is not host:port (e.g. 10.0.0.1:1234, process 0\'s '
                    f'host and a free port): fix it, {_ALONE}')


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
