"""Two ways to feed the training step, one example order (`data.epoch_permutation`).

- 'tfds' (host): the arrays tfds read stay in host memory; each step gets its batch, this
  process's rows of it, through `parallel.to_global`, and runs one jitted step.
- 'device': the training split is placed on the devices once (`place`); a jitted `lax.scan`
  runs `chunk_steps` steps per call, gathering each batch on device from the epoch's
  permutation. No host round trip per step.

Both run a step function `step_fn(state, sums, batch, numbers) -> (state, sums)` and give the
same batches in the same order, so they reach the same parameters (up to float rounding).
`numbers` (a dict of arrays, often empty) is passed to every call: the per-member numbers of
members that share one compiled step (loop.py).

A vmapped group of K members (population.py) needs the device input: its step takes (K, B, ...)
batches, member k's rows gathered along its own row of a (K, N) permutation, the member axis
sharded over the mesh's 'members' axis.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from digitjax import data, parallel


def place(split, mesh) -> dict[str, jax.Array]:
  """The training split on every device of `mesh` (MNIST's 54,000 images: 42 MB of uint8)."""
  return parallel.to_global(split, parallel.replicated(mesh))


class HostInput:
  """One jitted step per batch; batches are sliced from host arrays."""

  def __init__(self, split, batch_size: int, mesh, step_fn):
    self.split, self.batch_size, self.mesh = split, batch_size, mesh
    self.sharding = parallel.batch_sharding(mesh)
    self.sync_every = 20  # steps the host may queue ahead of the device
    self._jitted = jax.jit(step_fn, donate_argnums=(0, 1))
    self._step = None

  def compile(self, state, sums, numbers) -> float:
    start = time.perf_counter()
    spec = {k: jax.ShapeDtypeStruct((self.batch_size,) + v.shape[1:], v.dtype,
                                    sharding=self.sharding) for k, v in self.split.items()}
    self._step = self._jitted.lower(state, sums, spec, numbers).compile()
    return time.perf_counter() - start

  def run(self, state, sums, epoch_perm, first_step: int, end_step: int, numbers):
    """Yields (state, sums, steps_done_in_epoch) after each call, from `first_step` on."""
    perm = np.asarray(epoch_perm)[:end_step * self.batch_size]
    step = first_step
    index, count = parallel.share(self.mesh)
    for batch in data.host_batches(self.split, perm, self.batch_size, first_step, index, count):
      state, sums = self._step(state, sums, parallel.to_global(batch, self.sharding), numbers)
      step += 1
      yield state, sums, step


class DeviceInput:
  """`chunk_steps` steps per call in a jitted lax.scan over a device-resident split.

  `members` K > 0: the step is a vmapped group's, batches (K, B, ...) from a (K, N) permutation.
  """

  def __init__(self, arrays, batch_size: int, mesh, step_fn, chunk_steps: int,
               members: int = 0):
    self.arrays, self.batch_size, self.mesh, self.members = arrays, batch_size, mesh, members
    self.steps_per_epoch = len(arrays['label']) // batch_size
    self.chunk = max(1, min(chunk_steps, self.steps_per_epoch))
    self.sync_every = 1  # wait after every call: a call is already `chunk` steps
    apart = bool(members) and mesh.shape['members'] > 1
    sharding = (P(None, 'data') if apart else parallel.member_sharding(mesh, batch=True)
                if members else parallel.batch_sharding(mesh))
    program = chunk_program(step_fn, self.chunk, batch_size, sharding)
    if apart:
      program = _members_apart(program, mesh)
    self._jitted = jax.jit(program, donate_argnums=(0, 1))
    self._run = None

  def perm_sharding(self):
    return parallel.member_sharding(self.mesh) if self.members else parallel.replicated(self.mesh)

  def abstract_args(self, state, sums, numbers) -> tuple:
    """The arguments of one call, as shapes (for compiling ahead of time, here or for TPU)."""
    n = self.arrays['label'].shape[0]
    perm = jax.ShapeDtypeStruct(((self.members,) if self.members else ()) + (n,), jnp.int32,
                                sharding=self.perm_sharding())
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(self.mesh))
    return state, sums, self.arrays, perm, (scalar, scalar), numbers

  def lower(self, state, sums, numbers):
    return self._jitted.lower(*self.abstract_args(state, sums, numbers))

  def compile(self, state, sums, numbers) -> float:
    start = time.perf_counter()
    self._run = self.lower(state, sums, numbers).compile()
    return time.perf_counter() - start

  def run(self, state, sums, epoch_perm, first_step: int, end_step: int, numbers):
    """Like HostInput.run, `chunk` steps per call; stops at `end_step`."""
    perm = jax.device_put(jnp.asarray(epoch_perm, jnp.int32), self.perm_sharding())
    step = first_step
    while step < end_step:
      n = min(self.chunk, end_step - step)
      state, sums = self._run(state, sums, self.arrays, perm, (np.int32(step), np.int32(n)),
                              numbers)
      step += n
      yield state, sums, step


def _members_apart(program, mesh):
  """A vmapped group whose members are spread over the mesh's 'members' axis: each slice of
  that axis runs the scan for its own members only (shard_map), data parallelism within a
  member staying automatic. Members never exchange anything: compiled for TPU v5e, the plain
  vmapped program all-gathered conv1's input and the permutation across member chips at every
  step (benchmarks/tpu_compile.py)."""
  member = P('members')
  return jax.shard_map(program, mesh=mesh,
                       in_specs=(member, member, P(), member, P(), member),
                       out_specs=(member, member), axis_names=frozenset({'members'}),
                       check_vma=False)


def chunk_program(step_fn, chunk: int, batch_size: int, sharding):
  """The program of one call: scan_steps(state, sums, arrays, perm, (first_step, num_steps),
  numbers) runs steps first_step .. first_step+num_steps-1 of an epoch; the rest of the chunk
  is skipped.

  A fixed chunk length with a skipped tail keeps one compiled program for every chunk of every
  epoch, and chunks always start at the same steps, so a resumed run repeats the same programs.
  """
  def scan_steps(state, sums, arrays, perm, span, numbers):
    first_step, num_steps = span

    def body(carry, i):
      # The order runs along perm's last axis: a group's (K, N) perm gives (K, B) indices.
      idx = lax.dynamic_slice_in_dim(perm, (first_step + i) * batch_size, batch_size,
                                     perm.ndim - 1)
      batch = jax.lax.with_sharding_constraint({k: v[idx] for k, v in arrays.items()}, sharding)
      carry = lax.cond(i < num_steps, lambda c: step_fn(*c, batch, numbers), lambda c: c, carry)
      return carry, None

    (state, sums), _ = lax.scan(body, (state, sums), jnp.arange(chunk))
    return state, sums
  return scan_steps
