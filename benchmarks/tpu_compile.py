"""digitjax's own programs compiled for TPU topologies on a machine without a TPU, with what
XLA's TPU cost model and memory planner say about them. Nothing runs on a TPU here: every
"images/s" below is modeled by XLA's cost model, not measured.

  pip install 'jax[tpu]==0.10.2'        # in a venv: libtpu, compile-only TPU devices (~700 MB)
  python benchmarks/tpu_compile.py                          # v5e:2x2 and v5e:4x4, table
  python benchmarks/tpu_compile.py --json out.json          # also the rows as JSON
  python benchmarks/tpu_compile.py --topologies v4:2x2x2 --batches 128 --chunks 100 --quick

The programs are the ones a run builds, by the run's own code, on the topology's devices:

- mesh and choices: as population._train_group makes them: `parallel.make_mesh(devices=...)`,
  `configlib.resolve(config, backend='tpu', data_devices=..., group_size=K)` (TPU's 'auto'
  choices, asked for directly: nothing is patched), and for a vmapped group the mesh again with
  `members=population._member_axis(K, mesh)` chips along 'members'.
- train: `loop._Group(members, recipes, splits, mesh).make_inputs(batch, chunk_steps)`,
  the run's own feeder (`pipeline.DeviceInput`: jitted lax.scan of `chunk_steps` steps of
  steps.train_and_accumulate over the device-resident 54,000-image split; state and sums
  donated), compiled by its own `compile(carry, sums, numbers)`. The group's members come from
  `members.members_of` (a sweep 'seed=0,1,2,3' for the K=4 group: one vmapped program,
  states stacked along a member axis sharded over 'members').
  The only stand-in: a compile-only device holds no data, so while the group is built every
  `jax.device_put` onto the topology's devices (pipeline.place's training split, the group's
  per-member numbers, the sums) gives the array's shape with that sharding instead
  (`compile_only_transfers`); the carry (the state) is its `jax.eval_shape` with the sharding
  `_Group.carry` gives it.
- host-step: the same with input_pipeline='tfds' (`pipeline.HostInput`'s jitted step).
- eval: `inference.Evaluator.for_config(config, mesh, choices)`'s program on the batch
  `Evaluator.logits` pads the 6,000-image validation split to (eval_batch_size rounded up to
  the data devices: 1000 -> 1008 on 16 chips). Row 'tpu-auto (group mesh)' is a vmapped group's
  evaluator, on its ('members', 'data') mesh: members are evaluated one after another there.
- init: `_Group.init`'s program: jit of steps.init_state (vmapped over the members' keys for a
  group), on one chip, as a run computes it on the default device before replicating it.

Rows 'tpu-auto' use configlib.resolve(backend='tpu'); 'cpu-auto' compile, for comparison, the
formulations configlib.resolve(backend='cpu', data_devices=1) picks for one CPU device
(im2col convolutions, reshape pooling, gradient in 2 chunks) on the same TPU mesh. Without
--quick, rows change one TPU choice at a time.

How to read the numbers (all per chip: the SPMD program each chip runs):
- flops, bytes accessed, optimal_seconds: `compiled.cost_analysis()`, XLA's TPU cost model.
  It counts a while loop's body once, whatever its trip count: a chunk of 100 steps (one loop)
  reports one step, while chunk_steps=1 (no loop) reports the whole call. 'steps counted' says
  which. Modeled images/s = one member's images in the counted steps / optimal_seconds;
  member-images/s = K times that (every member's images).
- arg / out / alias / temp MB: `compiled.memory_analysis()` (alias: donated bytes reused).
- collectives: instructions in `compiled.as_text()`, counted once each where they appear (one
  inside the loop body runs every step); AR MB = bytes all-reduced per counted step.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import re
import sys
import time
import traceback

if __name__ == '__main__':
  # libtpu is loaded for its compile-only devices; JAX's default backend stays the CPU (no
  # attempt, and no noise, at starting a TPU backend on a machine without one).
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'configs'))
from digitjax import configlib, data, inference, loop, parallel, pipeline  # noqa: E402
from digitjax import members as members_lib, plan as plan_lib, population, steps  # noqa: E402

N_TRAIN = 54000  # MNIST's 60,000 training images less the default 10% validation holdout
N_VAL = 6000
MODELED = "modeled by XLA's TPU cost model, not measured"
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4,
          's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(name: str) -> list:
  """The compile-only devices of a TPU topology such as 'v5e:2x2'.

  A v4 topology is asked for in "megacore" mode, one device per chip, as a Cloud TPU v4 host
  runs: libtpu's default describes each of a v4 chip's two TensorCores as a device (16 for
  'v4:2x2x2').

  libtpu holds /tmp/libtpu_lockfile for the process that loaded it and refuses to load in any
  other ("ABORTED: Internal error when accessing libtpu multi-process lockfile"): a second
  compile job, or the test while this benchmark runs. Compile-only devices share no chip, so
  ALLOW_MULTIPLE_LIBTPU_LOAD=1 is set while the plugin loads (it is read then), and only then.
  """
  from jax.experimental import topologies
  previous = os.environ.get('ALLOW_MULTIPLE_LIBTPU_LOAD')
  os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD'] = '1'
  try:
    kwargs = {'chip_config_name': 'megacore'} if name.startswith('v4:') else {}
    return list(topologies.get_topology_desc(topology_name=name, platform='tpu',
                                             **kwargs).devices)
  finally:
    if previous is None:
      del os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD']
    else:
      os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD'] = previous


def make_config(overrides: dict):
  """configs/default.py with `overrides` ({'model.conv_impl': 'lax', ...}), checked by name."""
  import default
  config = default.get_config()
  for key, value in overrides.items():
    configlib.set_field(config, key, value)
  return config


# ---------------------------------------------------------------------------------------------
# The run's programs, on compile-only devices


def _shape(value, sharding):
  return jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype if not hasattr(
      value, 'dtype') else value.dtype, sharding=sharding)


@contextlib.contextmanager
def compile_only_transfers():
  """While active, `jax.device_put(x, sharding)` onto devices that cannot hold data (a TPU
  topology's compile-only devices) gives x's shapes with that sharding; any other transfer is
  the real one. The run's own code then builds its programs for the topology unchanged."""
  real_put = jax.device_put
  real_devices = set(jax.devices())

  def put(x, device=None, *args, **kwargs):
    if isinstance(device, jax.sharding.Sharding) and not device.device_set <= real_devices:
      return jax.tree.map(lambda v: _shape(v, device), x)
    return real_put(x, device, *args, **kwargs)

  jax.device_put = put
  try:
    yield
  finally:
    jax.device_put = real_put


def training_split(n: int = N_TRAIN) -> dict:
  """A training split's arrays (zeros, no memory: only their shapes and dtypes matter)."""
  return {'image': np.broadcast_to(np.zeros((), np.uint8), (n,) + steps.IMAGE_SHAPE),
          'label': np.broadcast_to(np.zeros((), np.int32), (n,))}


@dataclasses.dataclass
class Built:
  """A group as a run builds it on the topology: members, mesh, choices, _Group, feeders."""
  config: object          # the group's first member's config
  members: list
  mesh: object
  choices: configlib.Choices
  group: loop._Group
  inputs: list            # [(feeder, numbers)]: one per member ('map') or one ('vmap')


def build(config, devices, choices: dict | None = None, backend: str = 'tpu',
          n_train: int = N_TRAIN) -> Built:
  """The run's group for `config` (its sweep's members, one group) on `devices`.

  Mesh and choices as population._train_group makes them (its 6 lines, with `backend` and
  `devices` passed); `choices` replaces some resolved choices (e.g. {'conv_impl': 'im2col'}).
  """
  members = members_lib.members_of(config, '/unused')
  groups = members_lib.groups_of(members)
  if len(groups) != 1:
    raise ValueError(f'the sweep makes {len(groups)} groups; give members of one group')
  group = groups[0]
  cfg = group[0].config
  mesh = parallel.make_mesh(devices=devices)
  parallel.check_divisible('batch_size', cfg.batch_size, mesh)
  resolved = configlib.resolve(cfg, backend=backend, data_devices=parallel.data_size(mesh),
                               group_size=len(group))
  if resolved.execution == 'vmap' and len(group) > 1:
    mesh = parallel.make_mesh(members=population._member_axis(len(group), mesh), devices=devices)
    parallel.check_divisible('batch_size', cfg.batch_size, mesh)
  if choices:
    resolved = dataclasses.replace(resolved, **choices)
  spe = n_train // cfg.batch_size
  with compile_only_transfers():
    recipes = [plan_lib.recipe(m.config, spe, resolved) for m in group]
    g = loop._Group(group, recipes, data.Splits(training_split(n_train), None, None), mesh)
    inputs = g.make_inputs(cfg.batch_size, cfg.chunk_steps)
  return Built(cfg, group, mesh, resolved, g, inputs)


def _keys(group: loop._Group):
  return jax.eval_shape(lambda: jnp.stack([jax.random.key(m.config.seed) for m in group.members]))


def abstract_carry(group: loop._Group):
  """The loop's carry as shapes: what `group.carry(group.init())` holds (a list of replicated
  states, or one stacked state sharded along 'members')."""
  keys = _keys(group)
  if group.vmapped:
    init = jax.vmap(functools.partial(steps.init_state, group.specs[0], group.hypers[0]))
    stacked = jax.eval_shape(init, keys)
    sharding = parallel.member_sharding(group.mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        stacked)
  key = jax.ShapeDtypeStruct(keys.shape[1:], keys.dtype)
  return [group.abstract(jax.eval_shape(functools.partial(steps.init_state, spec, hp), key))
          for spec, hp in zip(group.specs, group.hypers)]


def compile_training(built: Built):
  """The first feeder's program, compiled by the feeder's own `compile`, as loop.start_training does."""
  g = built.group
  carry = abstract_carry(g)
  with compile_only_transfers():
    sums = g.empty_sums()
  feed, numbers = built.inputs[0]
  feed.compile(carry if g.vmapped else carry[0], sums if g.vmapped else sums[0], numbers)
  compiled = feed._run if isinstance(feed, pipeline.DeviceInput) else feed._step
  return compiled, {'chunk': getattr(feed, 'chunk', 1), 'feeder': type(feed).__name__,
                    'members_in_program': feed.members if g.vmapped else 1}


def compile_init(built: Built):
  """_Group.init's program (its jit of steps.init_state, vmapped for a group), on one chip."""
  g = built.group
  one_chip = SingleDeviceSharding(g.mesh.devices.flat[0])
  keys = _keys(g)
  if g.vmapped:
    init = jax.jit(jax.vmap(functools.partial(steps.init_state, g.specs[0], g.hypers[0])))
    arg = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=one_chip)
  else:
    init = jax.jit(functools.partial(steps.init_state, g.specs[0], g.hypers[0]))
    arg = jax.ShapeDtypeStruct(keys.shape[1:], keys.dtype, sharding=one_chip)
  return init.lower(arg).compile(), {}


def compile_eval(built: Built, n: int = N_VAL):
  """The Evaluator's program on the batch Evaluator.logits gives a split of `n` images."""
  mesh = built.group.flat  # where the loop evaluates each member (all devices on 'data')
  evaluator = inference.Evaluator.for_config(built.config, mesh, built.choices)
  devices = parallel.data_size(mesh)
  b = min(evaluator.batch_size, -(-max(n, 1) // devices) * devices)  # as Evaluator.logits
  state = inference.abstract_state(built.config, mesh)
  batch = {'image': jax.ShapeDtypeStruct((b,) + steps.IMAGE_SHAPE, jnp.uint8,
                                         sharding=parallel.batch_sharding(mesh))}
  return evaluator._step.lower(state, batch).compile(), {'eval_batch': b}


# ---------------------------------------------------------------------------------------------
# What the compiler says


def _elements(dims: str) -> int:
  n = 1
  for d in filter(None, dims.split(',')):
    n *= int(d)
  return n


def collectives(hlo: str) -> dict:
  """{op: count} of the collectives in an optimized HLO module, the all-reduced bytes, and
  each collective's result type and source op ('collective_types')."""
  counts = {op: 0 for op in COLLECTIVES}
  types = []
  all_reduce_bytes = 0
  for line in hlo.splitlines():
    m = re.search(r'=\s*(.*?)\s(' + '|'.join(COLLECTIVES) + r')(-start)?\(', line)
    if not m:
      continue
    counts[m.group(2)] += 1
    source = re.search(r'op_name="([^"]*)"', line)
    types.append(f'{m.group(2)} {re.sub(r"{[^}]*}", "", m.group(1))}'
                 + (f' ({source.group(1)})' if source else ''))
    if m.group(2) == 'all-reduce':
      for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', m.group(1)):
        all_reduce_bytes += _elements(dims) * _BYTES.get(dtype, 4)
  counts['all_reduce_bytes'] = all_reduce_bytes
  counts['collective_types'] = types
  return counts


def collective_shapes(hlo: str, ops=COLLECTIVES) -> list[tuple[str, tuple[int, ...]]]:
  """(op, shape) of every array a collective of `ops` produces."""
  out = []
  for line in hlo.splitlines():
    m = re.search(r'=\s*(.*?)\s(' + '|'.join(ops) + r')(-start)?\(', line)
    if m:
      for dims in re.findall(r'\b[a-z]+\d*\[([\d,]*)\]', m.group(1)):
        out.append((m.group(2), tuple(int(d) for d in filter(None, dims.split(',')))))
  return out


def all_reduce_elements(hlo: str) -> list[int]:
  """Element counts of the non-scalar arrays all-reduced anywhere in the module."""
  return [int(np.prod(s)) for _, s in collective_shapes(hlo, ('all-reduce',)) if s]


def measure(compiled, images_per_step: int | None, chunk: int, members: int = 1) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  loops = len(re.findall(r'\swhile\(', hlo))
  steps_counted = 1 if loops else chunk
  seconds = cost.get('optimal_seconds')
  images = images_per_step * steps_counted if images_per_step else None
  note = None
  if seconds is not None and seconds <= 0:
    note = (f'cost model gave optimal_seconds={seconds!r} (<= 0): no time is modeled for this '
            f'program, so no images/s')
  ips = images / seconds if images and seconds and seconds > 0 else None
  row = {
      'flops': cost.get('flops'), 'bytes_accessed': cost.get('bytes accessed'),
      'transcendentals': cost.get('transcendentals'), 'optimal_seconds': seconds,
      'steps_counted': steps_counted if images_per_step else None,
      'modeled_images_per_s': ips,
      'modeled_member_images_per_s': ips * members if ips else None,
      'cost_model_note': note,
      'argument_bytes': mem.argument_size_in_bytes, 'output_bytes': mem.output_size_in_bytes,
      'alias_bytes': mem.alias_size_in_bytes, 'temp_bytes': mem.temp_size_in_bytes,
      'generated_code_bytes': mem.generated_code_size_in_bytes,
      'while_loops': loops,
  }
  row.update(collectives(hlo))
  return row


# ---------------------------------------------------------------------------------------------
# The table


def cpu_choices(config) -> dict:
  """The formulations one CPU device runs (configlib.resolve(backend='cpu', data_devices=1))."""
  c = configlib.resolve(config, backend='cpu', data_devices=1)
  return {'conv_impl': c.conv_impl, 'pool_impl': c.pool_impl, 'grad_chunks': c.grad_chunks}


def cases(batches, chunks, members: int, quick: bool, dtypes=('float32',)):
  """(program, label, config overrides, choice overrides) for one topology."""
  loop_chunk = max(chunks)
  b_mid = 128 if 128 in batches else batches[0]
  out = [('init', 'tpu-auto', {}, None),
         ('eval', 'tpu-auto', {}, None)]  # eval_batch_size 1000, the default
  for b in batches:
    for c in chunks:
      out.append(('train', 'tpu-auto', {'batch_size': b, 'chunk_steps': c}, None))
  for b in batches:
    out.append(('train', 'cpu-auto', {'batch_size': b, 'chunk_steps': loop_chunk}, 'cpu'))
  if not quick:
    for b in sorted({b_mid, max(batches)}):
      base = {'batch_size': b, 'chunk_steps': loop_chunk}
      out += [('train', 'im2col conv', base, {'conv_impl': 'im2col'}),
              ('train', 'reshape pool', base, {'pool_impl': 'reshape'}),
              ('train', 'grad_chunks 2', base, {'grad_chunks': 2})]
    out.append(('host-step', 'tpu-auto', {'batch_size': b_mid, 'input_pipeline': 'tfds'}, None))
  if members > 1:
    group = {'batch_size': b_mid, 'chunk_steps': loop_chunk, 'sweep.select': 'ensemble',
             'sweep.grid': 'seed=' + ','.join(str(s) for s in range(members))}
    out += [('init', 'tpu-auto', group, None),
            ('train', 'tpu-auto', group, None),
            ('train', 'cpu-auto', group, 'cpu'),
            ('eval', 'tpu-auto (group mesh)', group, None)]
    if not quick:
      lrs = ','.join(f'{0.01 * 2 ** (i - 1):g}' for i in range(members))
      out.append(('train', 'tpu-auto, lr grid', {**group, 'sweep.grid': f'learning_rate={lrs}'},
                  None))
  for dtype in dtypes:  # the same programs in other precisions (model.dtype)
    if dtype == 'float32':
      continue
    other = {'model.dtype': dtype}
    out.append(('eval', f'tpu-auto {dtype}', other, None))
    for b in batches:
      out.append(('train', f'tpu-auto {dtype}',
                  {**other, 'batch_size': b, 'chunk_steps': loop_chunk}, None))
    if members > 1:
      out.append(('train', f'tpu-auto {dtype}', {**group, **other}, None))
  return out


def run_case(topology, devices, program, label, overrides, choice_overrides):
  config = make_config(overrides)
  row = {'topology': topology, 'chips': len(devices), 'program': program, 'choices': label,
         'batch': config.batch_size, 'members': None, 'mesh': None, 'execution': None,
         'chunk_steps': None, 'grad_chunks': None, 'conv_impl': None, 'pool_impl': None}
  start = time.perf_counter()
  try:
    extra = cpu_choices(config) if choice_overrides == 'cpu' else choice_overrides
    built = build(config, devices, extra)
    k = len(built.members)
    c = built.choices
    row.update(members=k, mesh=dict(built.mesh.shape), execution=c.execution)
    if program == 'eval':
      row.update(conv_impl=c.eval_conv_impl, pool_impl=c.eval_pool_impl)
      compiled, info = compile_eval(built)
      row['batch'] = info['eval_batch']
      row.update(measure(compiled, info['eval_batch'], 1))
    elif program == 'init':
      row.update(conv_impl=None, pool_impl=None, batch=None)
      compiled, _ = compile_init(built)
      row['mesh'] = {'chips': 1}
      row.update(measure(compiled, None, 1))
    else:
      row.update(conv_impl=c.conv_impl, pool_impl=c.pool_impl, grad_chunks=c.grad_chunks)
      compiled, info = compile_training(built)
      row['chunk_steps'] = info['chunk']
      row.update(measure(compiled, config.batch_size, info['chunk'], k))
    row['error'] = None
  except Exception as e:  # reported in the table: a failure is a finding
    row['error'] = f'{type(e).__name__}: {e}'.strip()
    row['traceback'] = traceback.format_exc(limit=-4)
  row['compile_seconds'] = round(time.perf_counter() - start, 2)
  return row


def _mb(x):
  return '' if x is None else f'{x / 2**20:.1f}'


def _num(x, fmt=',.0f'):
  return '' if x is None else format(x, fmt)


def table(rows) -> str:
  head = ('| topology | program | choices | mesh | batch | K | chunk | conv / pool / grad chunks | '
          'GFLOP/chip | MB accessed | optimal µs | steps counted | '
          'modeled images/s (per member) | modeled member-images/s | '
          'arg MB | out MB | alias MB | temp MB | AR | AG | RS | CP | AR MB | compile s |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    mesh = 'x'.join(f'{k}:{v}' for k, v in (r.get('mesh') or {}).items())
    impl = ' / '.join(str(x) for x in (r.get('conv_impl'), r.get('pool_impl'),
                                       r.get('grad_chunks')) if x is not None)
    lead = (f"| {r['topology']} | {r['program']} | {r['choices']} | {mesh} | "
            f"{r['batch'] or ''} | {r['members'] or ''} | {r.get('chunk_steps') or ''} | "
            f"{impl} | ")
    if r.get('error'):
      lines.append(lead + f"FAILED: {r['error'].splitlines()[0][:300]} |" + ' |' * 15)
      continue
    lines.append(
        lead + f"{r['flops'] / 1e9:.3f} | {_mb(r['bytes_accessed'])} | "
        f"{r['optimal_seconds'] * 1e6:.1f}{' (!)' if r['cost_model_note'] else ''} | "
        f"{r['steps_counted'] or ''} | {_num(r['modeled_images_per_s'])} | "
        f"{_num(r['modeled_member_images_per_s'])} | {_mb(r['argument_bytes'])} | "
        f"{_mb(r['output_bytes'])} | {_mb(r['alias_bytes'])} | {_mb(r['temp_bytes'])} | "
        f"{r['all-reduce']} | {r['all-gather']} | {r['reduce-scatter']} | "
        f"{r['collective-permute']} | {_mb(r['all_reduce_bytes'])} | {r['compile_seconds']} |")
  failures = [r for r in rows if r.get('error')]
  notes = [r for r in rows if r.get('cost_model_note')]
  gathers = [r for r in rows if not r.get('error') and r['all-gather']]
  if failures:
    lines += ['', 'Compile failures (exact errors):', '']
    lines += [f"- {r['topology']} {r['program']} {r['choices']} batch {r['batch']} "
              f"K={r['members']} mesh {r.get('mesh')}: `{r['error']}`" for r in failures]
  if gathers:
    lines += ['', 'All-gathers (result type, source op):', '']
    for r in gathers:
      kinds = sorted({t for t in r['collective_types'] if t.startswith('all-gather')})
      lines.append(f"- {r['topology']} {r['program']} {r['choices']} batch {r['batch']} "
                   f"K={r['members']}: " + '; '.join(f'`{t}`' for t in kinds))
  if notes:
    lines += ['', '(!) cost model: optimal_seconds <= 0 for:', '']
    lines += [f"- {r['topology']} {r['program']} {r['choices']} batch {r['batch']} "
              f"K={r['members']} mesh {r.get('mesh')}: {r['cost_model_note']}" for r in notes]
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--topologies', default='v5e:2x2,v5e:4x4',
                      help='e.g. v5e:2x2,v5e:4x4,v4:2x2x2 (v4 in megacore mode)')
  parser.add_argument('--batches', default='32,128,1024', help='global batch sizes')
  parser.add_argument('--chunks', default='1,100', help='chunk_steps values')
  parser.add_argument('--members', type=int, default=4, help='size of the vmapped group (1: none)')
  parser.add_argument('--quick', action='store_true',
                      help='skip the one-choice-at-a-time rows, the host step and the lr grid')
  parser.add_argument('--dtypes', default='float32,bfloat16',
                      help='model.dtype values: the training chunk, eval and group in each')
  parser.add_argument('--json', help='also write the rows to this file')
  args = parser.parse_args(argv)
  if not libtpu_available():
    sys.exit("libtpu is not installed: pip install 'jax[tpu]==0.10.2' (in a venv)")
  batches = [int(b) for b in args.batches.split(',')]
  chunks = [int(c) for c in args.chunks.split(',')]
  rows = []
  for topology in args.topologies.split(','):
    devices = topology_devices(topology)
    print(f"{topology}: {len(devices)} chips; TPU 'auto' choices (configlib.resolve): "
          f"{configlib.resolve(make_config({}), backend='tpu', data_devices=len(devices))}",
          file=sys.stderr, flush=True)
    for case in cases(batches, chunks, args.members, args.quick, args.dtypes.split(',')):
      row = run_case(topology, devices, *case)
      rows.append(row)
      status = row['error'] or (f"{row['optimal_seconds'] * 1e6:.1f} µs modeled, "
                                f"{row['flops'] / 1e9:.3f} GFLOP/chip")
      print(f"[{row['compile_seconds']:6.1f}s] {topology} {case[0]} {case[1]} "
            f"B={row['batch']} K={row['members']} chunk={row['chunk_steps']} "
            f"mesh={row['mesh']}: {status}", file=sys.stderr, flush=True)
  print(f'\nPer chip; flops, bytes, optimal µs and images/s are {MODELED} (see the module '
        f'docstring). jax {jax.__version__}.\n')
  print(table(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'jax': jax.__version__, 'note': MODELED, 'rows': rows}, f, indent=1,
                default=str)


if __name__ == '__main__':
  main()
