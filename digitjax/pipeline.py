"""Two ways to feed the training step, one example order (`data.epoch_permutation`).

- 'tfds' (host): the arrays tfds read stay in host memory; each step gets its batch, this
  process's rows of it, through `parallel.to_global`, and runs one jitted step.
- 'device': the training split is placed on the devices once; a jitted `lax.scan` runs
  `chunk_steps` steps per call, gathering each batch on device from the epoch's permutation.
  No host round trip per step.

Both run the same step function `step_fn(state, sums, batch) -> (state, sums)` and give the same
batches in the same order, so they reach the same parameters (up to float rounding).

A seed ensemble (`ensemble_size` K > 1, see ensemble.py) needs the device input: its vmapped step
takes (K, B, ...) batches, each member's rows gathered from its own row of a (K, N) permutation.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from digitjax import data, parallel


def resolve(kind: str) -> str:
  """'auto' is 'device' on every backend (and the one path that feeds ensembles).

  On this 2-core CPU the device path ran the tutorial's epoch at 7.27 ms/step and the tfds path
  at 8.52, medians of 5 (benchmarks/compare.py, README "Performance"): the device path runs
  im2col for all three convolutions (XLA:CPU's own is slow inside a loop), and with im2col's
  kernel gradient as a plain product that is now the faster step, with no per-step slicing,
  transfer or dispatch on the host. (Before that change the tfds path was slightly ahead, 8.76
  vs 8.94 ms/step, and was the CPU's 'auto'.) On a GPU or TPU the device path saves a
  host-to-device copy and a dispatch per step.
  """
  if kind != 'auto':
    return kind
  return 'device'


class HostInput:
  """One jitted step per batch; batches are sliced from host arrays."""

  def __init__(self, split, batch_size: int, mesh, step_fn):
    self.split, self.batch_size, self.mesh = split, batch_size, mesh
    self.sharding = parallel.batch_sharding(mesh)
    self.steps_per_epoch = len(split['label']) // batch_size
    self.sync_every = 20  # steps the host may queue ahead of the device
    self._jitted = jax.jit(step_fn, donate_argnums=(0, 1))
    self._step = None

  def compile(self, state, sums) -> float:
    start = time.perf_counter()
    spec = {k: jax.ShapeDtypeStruct((self.batch_size,) + v.shape[1:], v.dtype,
                                    sharding=self.sharding) for k, v in self.split.items()}
    self._step = self._jitted.lower(state, sums, spec).compile()
    return time.perf_counter() - start

  def run(self, state, sums, epoch_perm, first_step: int, end_step: int | None = None):
    """Yields (state, sums, steps_done_in_epoch) after each call, from `first_step` on."""
    perm = np.asarray(epoch_perm)[:(end_step or self.steps_per_epoch) * self.batch_size]
    step = first_step
    for batch in data.host_batches(self.split, perm, self.batch_size, first_step,
                                   jax.process_index(), jax.process_count()):
      state, sums = self._step(state, sums, parallel.to_global(batch, self.sharding))
      step += 1
      yield state, sums, step


class DeviceInput:
  """`chunk_steps` steps per call in a jitted lax.scan over a device-resident split."""

  def __init__(self, split, batch_size: int, mesh, step_fn, chunk_steps: int,
               ensemble_size: int = 1):
    self.batch_size, self.mesh = batch_size, mesh
    self.steps_per_epoch = len(split['label']) // batch_size
    self.chunk = max(1, min(chunk_steps, self.steps_per_epoch))
    self.sync_every = 1  # wait after every call: a call is already `chunk` steps
    self.arrays = parallel.to_global(split, parallel.replicated(mesh))
    # An ensemble's batches are (K, B, ...): the batch axis, split across devices, is then 1.
    self.members = () if ensemble_size == 1 else (ensemble_size,)
    sharding = (parallel.batch_sharding(mesh) if ensemble_size == 1
                else NamedSharding(mesh, P(None, 'data')))
    self._jitted = jax.jit(functools.partial(_scan_steps, step_fn, self.chunk, batch_size,
                                             sharding),
                           donate_argnums=(0, 1))
    self._run = None

  def compile(self, state, sums) -> float:
    start = time.perf_counter()
    n = len(self.arrays['label'])
    perm = jax.ShapeDtypeStruct(self.members + (n,), jnp.int32,
                                sharding=parallel.replicated(self.mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(self.mesh))
    self._run = self._jitted.lower(state, sums, self.arrays, perm, scalar, scalar).compile()
    return time.perf_counter() - start

  def run(self, state, sums, epoch_perm, first_step: int, end_step: int | None = None):
    """Like HostInput.run, `chunk` steps per call; stops at `end_step` (default: epoch end)."""
    perm = jax.device_put(jnp.asarray(epoch_perm, jnp.int32), parallel.replicated(self.mesh))
    step, end = first_step, end_step or self.steps_per_epoch
    while step < end:
      n = min(self.chunk, end - step)
      state, sums = self._run(state, sums, self.arrays, perm, np.int32(step), np.int32(n))
      step += n
      yield state, sums, step


def _scan_steps(step_fn, chunk, batch_size, sharding, state, sums, arrays, perm, first_step,
                num_steps):
  """Runs steps first_step .. first_step+num_steps-1 of an epoch; the rest of the chunk is skipped.

  A fixed chunk length with a skipped tail keeps one compiled program for every chunk of every
  epoch, and chunks always start at the same steps, so a resumed run repeats the same programs.
  """
  def body(carry, i):
    # The order runs along perm's last axis: an ensemble's (K, N) perm gives (K, B) indices.
    idx = lax.dynamic_slice_in_dim(perm, (first_step + i) * batch_size, batch_size, perm.ndim - 1)
    batch = jax.lax.with_sharding_constraint({k: v[idx] for k, v in arrays.items()}, sharding)
    carry = lax.cond(i < num_steps, lambda c: step_fn(*c, batch), lambda c: c, carry)
    return carry, None

  (state, sums), _ = lax.scan(body, (state, sums), jnp.arange(chunk))
  return state, sums


def make_input(kind: str, split, batch_size: int, mesh, step_fn, chunk_steps: int = 100,
               ensemble_size: int = 1):
  kind = resolve(kind)
  if kind == 'device':
    return DeviceInput(split, batch_size, mesh, step_fn, chunk_steps, ensemble_size)
  if kind == 'tfds':
    if ensemble_size > 1:  # configlib.validate tells the user; this guards other callers
      raise ValueError('ensembles need the device input path')
    return HostInput(split, batch_size, mesh, step_fn)
  raise ValueError(kind)
