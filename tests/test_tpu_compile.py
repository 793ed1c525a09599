"""The training chunk, as a run builds it (loop._Group's feeder, TPU's 'auto' choices from
configlib.resolve(backend='tpu')), compiles for a TPU v5e 2x2 topology: no TPU is needed, libtpu
compiles for compile-only devices (benchmarks/tpu_compile.py).

- one model, data parallel over the four chips: the gradient, all 159,254 parameters, is
  all-reduced, and nothing is gathered or resharded;
- a vmapped group of four members, the member axis over the four chips: no all-reduce at all
  (members are independent), and no parameter or gradient crosses a chip.

Needs libtpu (`pip install 'jax[tpu]==0.10.2'`, in a venv); skipped without it, except in CI
(CI set), where a missing libtpu fails the test instead of hiding it.
"""
import functools
import importlib.util
import math
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))

NUM_PARAMS = 159254         # the tutorial's CNN
FLOPS_PER_IMAGE = 26.8e6    # forward + backward: about 3 x 2 x 4.47M multiply-adds


def _require_libtpu():
  if importlib.util.find_spec('libtpu') is not None:
    return
  reason = ("libtpu is not installed (pip install 'jax[tpu]==0.10.2' in a venv): cannot "
            "compile for TPU topologies")
  if os.environ.get('CI'):
    pytest.fail(f'CI is set but {reason}')
  pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def _v5e_2x2() -> tuple:
  import tpu_compile
  devices = tpu_compile.topology_devices('v5e:2x2')
  assert len(devices) == 4 and {d.platform for d in devices} == {'tpu'}
  return tuple(devices)


def v5e_2x2() -> list:
  """The topology's four compile-only devices; without libtpu the test skips (fails in CI)."""
  _require_libtpu()
  return list(_v5e_2x2())


def _param_count(carry) -> int:
  from digitjax import model as model_lib
  return model_lib.count_params(carry.params)


def test_training_chunk_compiles_for_v5e_2x2_with_a_data_parallel_all_reduce():
  devices = v5e_2x2()
  import tpu_compile
  config = tpu_compile.make_config({'batch_size': 32, 'chunk_steps': 2})
  built = tpu_compile.build(config, devices)
  # TPU's 'auto' choices, as configlib.resolve gives them for 4 data devices.
  c = built.choices
  assert (c.backend, c.input_pipeline, c.conv_impl, c.pool_impl, c.grad_chunks, c.execution) == (
      'tpu', 'device', 'lax', 'lax', 1, 'map')
  assert dict(built.mesh.shape) == {'members': 1, 'data': 4}
  compiled, info = tpu_compile.compile_training(built)
  assert info == {'chunk': 2, 'feeder': 'DeviceInput', 'members_in_program': 1}
  hlo = compiled.as_text()
  row = tpu_compile.measure(compiled, config.batch_size, info['chunk'])

  # The scan stays a loop, which XLA's cost analysis counts once: one step of 8 images per chip.
  assert row['while_loops'] == 1 and row['steps_counted'] == 1
  assert 0.5 * 8 * FLOPS_PER_IMAGE < row['flops'] < 2 * 8 * FLOPS_PER_IMAGE, row['flops']
  assert row['optimal_seconds'] > 0 and row['modeled_images_per_s'] > 0
  # Data parallelism: the replicated parameters' gradient is summed over the chips (and the
  # step's scalar loss and accuracy), and nothing is gathered or resharded.
  assert row['all-reduce'] >= 1
  assert row['all-gather'] == row['reduce-scatter'] == row['collective-permute'] == 0
  assert row['all-to-all'] == 0
  carry = tpu_compile.abstract_carry(built.group)[0]
  assert _param_count(carry) == NUM_PARAMS
  assert sum(tpu_compile.all_reduce_elements(hlo)) == NUM_PARAMS, row['collective_types']
  # Donation: the state and sums come back in the buffers they arrived in.
  assert row['alias_bytes'] >= 2 * 4 * NUM_PARAMS  # float32 parameters and momentum


def test_vmapped_group_of_4_members_sharded_over_4_chips_exchanges_nothing():
  devices = v5e_2x2()
  import jax
  import tpu_compile
  from digitjax import pipeline
  config = tpu_compile.make_config({'batch_size': 32, 'chunk_steps': 2,
                                    'sweep.grid': 'seed=0,1,2,3', 'sweep.select': 'ensemble'})
  built = tpu_compile.build(config, devices)
  assert built.choices.execution == 'vmap' and built.group.vmapped
  assert dict(built.mesh.shape) == {'members': 4, 'data': 1}  # one member per chip
  feed, numbers = built.inputs[0]
  assert len(built.inputs) == 1 and isinstance(feed, pipeline.DeviceInput) and feed.members == 4
  assert numbers == {}  # the members differ in their seed only
  compiled, info = tpu_compile.compile_training(built)
  hlo = compiled.as_text()
  row = tpu_compile.measure(compiled, config.batch_size, info['chunk'], members=4)

  assert row['while_loops'] == 1 and row['steps_counted'] == 1
  # Each chip trains its own member on that member's 32 images, not all four members.
  assert 0.5 * 32 * FLOPS_PER_IMAGE < row['flops'] < 2 * 32 * FLOPS_PER_IMAGE, row['flops']
  # Members are independent, and each chip runs its own (pipeline._members_apart: shard_map
  # over 'members'): no collective at all. (The plain vmapped program all-gathered conv1's
  # input images across the member chips at every step: vmap folds the member axis into that
  # convolution's single input channel.)
  assert [row[c] for c in ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute',
                           'all-to-all')] == [0] * 5, row['collective_types']
  carry = tpu_compile.abstract_carry(built.group)
  param_shapes = {tuple(x.shape[1:]) for x in jax.tree.leaves(carry.params)}
  param_shapes |= {(k,) + s for s in param_shapes for k in (1, 4)}
  crossing = [(op, s) for op, s in tpu_compile.collective_shapes(hlo) if s in param_shapes]
  assert not crossing, crossing
  assert sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(carry.params)) == NUM_PARAMS
  # Donation, per chip: the member's state comes back in its buffers, and each chip holds one
  # member's float32 parameters and momentum, not the four (the stacked state is sharded).
  assert 2 * 4 * NUM_PARAMS <= row['alias_bytes'] < 2 * 2 * 4 * NUM_PARAMS, row['alias_bytes']
