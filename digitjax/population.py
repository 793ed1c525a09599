"""Experiments as populations: members (the base config plus overrides), trained in groups,
compared side by side, and one delivered model chosen on validation.

config.sweep declares the members (configs/default.py documents the syntax):
- `grid`: 'field=v1,v2,...; field=v1,...' -> every combination, in the order written;
- `members`: override sets, each 'field=value; field=value' ('' = the config as it is);
  with a grid, each set is combined with every grid point;
- `select`: what the population delivers: 'best' (by validation accuracy), 'ensemble' (the mean
  probabilities of all members) or 'top<k>' (of the k best by validation accuracy).
Members share the data and its validation holdout (that of the base config's seed). A config
without a sweep is a population of one: its run is exactly a single run, in the workdir itself.

Members that differ only in numbers (configlib.MEMBER_NUMERIC_FIELDS: seed, learning rate,
momentum, weight decay, warmup, augmentation ranges, dropout rate) form one group, trained
side by side by loop.train_group ('map' or 'vmap', configlib.resolve); members that differ in
structure (widths, BatchNorm, batch size, epochs, schedule kind...) form groups trained one
after another. With several processes, members are dealt out to them (member i to process
i mod P), each process training its own on its own devices: no communication between them
until the end, when process 0 combines the results.

Before any work, estimate_cost sizes the population from its config (the largest group's
states, every member's logits, the checkpoints, the open files) and check_cost refuses, in one
line, one this machine cannot hold; config.sweep.allow_large=True goes ahead anyway.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import re
import resource
import shutil
import time

import jax
import numpy as np

from digitjax import configlib, data, inference, loop, metrics as metrics_lib
from digitjax import model as model_lib, parallel, search, search_steps, signals, steps
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError
from digitjax.metrics import log


# ---------------------------------------------------------------------------------------------
# The sweep's syntax


def _split_top(text: str, sep: str) -> list[str]:
  """`text` split at each `sep` outside brackets and quotes."""
  parts, depth, quote, current = [], 0, None, []
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == sep and depth == 0:
      parts.append(''.join(current))
      current = []
      continue
    current.append(ch)
  parts.append(''.join(current))
  return parts


def _literal(text: str):
  """A Python literal (0.01, True, (32, 64, 64), 'cosine'), or a bare word as a string."""
  text = text.strip()
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_overrides(text: str, where: str) -> dict:
  """'a=1; b.c=(1, 2)' -> {'a': 1, 'b.c': (1, 2)}."""
  overrides = {}
  for item in filter(str.strip, _split_top(text, ';')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or not key or not value.strip():
      raise UserError(f"{where}: {item.strip()!r} is not field=value (e.g. "
                      f"'model.batch_norm=True'; several separated by ';')")
    if key in overrides:
      raise UserError(f'{where}: {key} is set twice')
    overrides[key] = _literal(value)
  return overrides


def parse_grid(text: str) -> list[tuple[str, list]]:
  """'learning_rate=0.01,0.1; seed=0,1' -> [('learning_rate', [0.01, 0.1]), ('seed', [0, 1])]."""
  axes = []
  for item in filter(str.strip, _split_top(text, ';')):
    key, sep, values = item.partition('=')
    key = key.strip()
    values = [v for v in _split_top(values, ',') if v.strip()]
    if not sep or not key or not values:
      raise UserError(f"config.sweep.grid: {item.strip()!r} is not field=v1,v2,... (e.g. "
                      f"'learning_rate=0.003,0.01,0.03,0.1; seed=0,1,2')")
    if key in (k for k, _ in axes):
      raise UserError(f'config.sweep.grid: {key} is swept twice')
    values = [_literal(v) for v in values]
    if len({json.dumps(v, default=str) for v in values}) < len(values):
      raise UserError(f'config.sweep.grid: {key} lists a value twice ({values})')
    axes.append((key, values))
  return axes


def format_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(format_value(v) for v in value) + ')'
  return str(value)


def member_name(overrides: dict) -> str:
  return ','.join(f'{k}={format_value(v)}' for k, v in overrides.items()) or 'base'


SELECT_RE = re.compile(r'^(best|ensemble|top([1-9][0-9]*))$')


# ---------------------------------------------------------------------------------------------
# Members


def override_sets(config) -> list[dict]:
  """Each member's overrides, in order, from the sweep's syntax alone (nothing is built)."""
  configlib.validate(config)
  select = config.sweep.select
  if not SELECT_RE.match(select):
    raise UserError(f"config.sweep.select={select!r} is invalid: it must be 'best', "
                    f"'ensemble' or 'top<k>' (e.g. 'top3')")
  if isinstance(config.sweep.members, str) or not all(
      isinstance(m, str) for m in config.sweep.members):
    raise UserError(f'config.sweep.members={config.sweep.members!r} is invalid: it must be a '
                    f"tuple of override strings, e.g. ('', 'model.batch_norm=True')")
  sets = [parse_overrides(text, f'config.sweep.members[{i}]')
          for i, text in enumerate(config.sweep.members)] or [{}]
  grid = parse_grid(config.sweep.grid)
  combos = list(itertools.product(*[[(k, v) for v in values] for k, values in grid]))
  overrides = []
  for chosen in sets:
    for combo in combos:
      both = set(chosen) & {k for k, _ in combo}
      if both:
        raise UserError(f'config.sweep: {sorted(both)[0]} is set both by config.sweep.members '
                        f'and by config.sweep.grid; set it in one of them')
      overrides.append({**chosen, **dict(combo)})
  return overrides


def members_of(config, workdir: str) -> list[loop.Member]:
  """The members `config` declares, each validated; a UserError names the first bad one."""
  overrides = override_sets(config)
  if len(overrides) == 1 and not overrides[0]:
    return [loop.Member(0, 'base', {}, config, workdir_lib.RunFiles.of(workdir))]
  base_split_seed = configlib.split_seed(config)
  members, seen = [], {}
  for i, chosen in enumerate(overrides):
    signals.check("while checking the population's members; nothing was written")
    name = member_name(chosen)
    where = f'config.sweep member {i} ({name})'
    member = config.copy_and_resolve_references()
    member.sweep.grid, member.sweep.members = '', ()
    for key, value in chosen.items():
      if configlib.matches(key, configlib.SHARED_FIELDS):
        raise UserError(f'{where}: {key} is shared by every member (they are compared and '
                        f'combined on the same data); set it for the whole population')
      try:
        configlib.set_field(member, key, value)
      except UserError as e:
        raise UserError(f'{where}: {e}') from None
    member.data.split_seed = base_split_seed  # members share the base config's holdout
    try:
      configlib.validate(member)
    except UserError as e:
      raise UserError(f'{where}: {e}') from None
    key = json.dumps(member.to_dict(), sort_keys=True, default=str)
    if key in seen:
      raise UserError(f'{where} is the same config as member {seen[key]}; remove one of them')
    seen[key] = i
    members.append(loop.Member(i, name, chosen, member,
                               workdir_lib.member_files(workdir, i, name)))
  _check_select(config, len(members))
  return members


def _check_select(config, size: int) -> None:
  top = SELECT_RE.match(config.sweep.select).group(2)
  if top and int(top) > size:
    raise UserError(f'config.sweep.select={config.sweep.select!r} asks for more members than '
                    f'the population has ({size})')
  if size > 1 and config.sweep.select != 'ensemble' and config.validation_fraction == 0:
    raise UserError(f"config.sweep.select={config.sweep.select!r} chooses by validation "
                    f"accuracy, and config.validation_fraction=0 leaves no validation split; "
                    f"hold some out, or use select='ensemble'")


def group_key(config) -> str:
  """What members of one group share: everything but the per-member numbers (and of those,
  whether weight decay and a constant schedule's warmup are there at all: they change the
  optimizer state's tree)."""
  fields = config.to_dict()
  for name in configlib.MEMBER_NUMERIC_FIELDS:
    *parents, leaf = name.split('.')
    target = fields
    for p in parents:
      target = target[p]
    target.pop(leaf)
  fields['_weight_decay'] = config.weight_decay > 0
  fields['_warmup'] = config.warmup_epochs > 0
  for name in ('checkpoint_keep', 'log_every_steps'):
    fields.pop(name)
  return json.dumps(fields, sort_keys=True, default=str)


def groups_of(members: list[loop.Member]) -> list[list[loop.Member]]:
  """Members that can share a program, in the order of their first member."""
  groups: dict[str, list] = {}
  for m in members:
    groups.setdefault(group_key(m.config), []).append(m)
  return list(groups.values())


# ---------------------------------------------------------------------------------------------
# Cost: what a population needs, estimated from its config before any work

# Examples in (train, test) before the data is read; other datasets are assumed as large.
SPLIT_SIZES = {'mnist': (60000, 10000), 'fashion_mnist': (60000, 10000)}
MEMORY_SHARE = 0.8         # of the machine's total memory a population may plan to fill
RUNTIME_BYTES = 2 << 30    # any run: JAX, XLA's compiler, the data's readers and arrays
MEMBER_BYTES = 1 << 20     # each member: checkpoint manager, metric writer, records (0.2 MB seen)
STATE_COPIES = 3           # states per member of the group in training: the working one, the
#                            initial one kept while a resumed group restores, orbax's host copy
OPEN_FILES_SPARE = 256     # open files left to the rest of the process (each member of the group
#                            in training holds one: its TensorBoard writer)


@dataclasses.dataclass
class Cost:
  """A population's needs, estimated before the data is read (estimate_cost)."""
  members: int
  memory: int          # bytes at the peak: the largest group's states, every member's logits
  disk: int            # bytes of checkpoints: checkpoint_keep + the best + one being written
  largest_group: int   # members trained at once


def _state_bytes(config, structural: dict) -> int:
  """Bytes of one member's training state (parameters and optimizer state) with the
  structural `structural` overrides; 0 where they are invalid (members_of names them)."""
  cfg = config.copy_and_resolve_references()
  try:
    for key, value in structural.items():
      configlib.set_field(cfg, key, value)
    configlib.validate(cfg)
  except UserError:
    return 0
  spec = steps.spec(cfg, model_lib.build_model(cfg.model), 1)
  shapes = jax.eval_shape(functools.partial(steps.init_state, spec, steps.hyper(cfg, 1)),
                          jax.random.key(0))
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(shapes) if np.issubdtype(x.dtype, np.number))


def estimate_cost(config, overrides: list[dict]) -> Cost:
  """Memory and disk of the population whose members' overrides are `overrides`: members
  that differ only in numbers share a structure, whose state is sized once (jax.eval_shape)."""
  n_train, n_test = SPLIT_SIZES.get(config.dataset, SPLIT_SIZES['mnist'])
  if config.data.max_train_examples:
    n_train = min(n_train, config.data.max_train_examples)
  n_val = int(round(n_train * config.validation_fraction))
  logits = (n_val + n_test) * config.model.num_classes * 4  # float32, kept for the selection
  structures: dict[str, list] = {}  # structural overrides -> [members, state bytes]
  for i, chosen in enumerate(overrides):
    if i % 1000 == 0:
      signals.check("while estimating the population's size; nothing was written")
    structural = {k: v for k, v in chosen.items()
                  if not configlib.matches(k, configlib.MEMBER_NUMERIC_FIELDS)}
    key = json.dumps(structural, sort_keys=True, default=str)
    if key not in structures:
      structures[key] = [0, _state_bytes(config, structural)]
    structures[key][0] += 1
  states = sum(n * size for n, size in structures.values())
  return Cost(members=len(overrides),
              memory=(RUNTIME_BYTES + len(overrides) * (logits + MEMBER_BYTES)
                      + STATE_COPIES * max(n * size for n, size in structures.values())),
              disk=states * (config.checkpoint_keep + 2),
              largest_group=max(n for n, _ in structures.values()))


def machine() -> dict:
  """What this machine offers: total memory, and the soft limit of open files."""
  try:
    memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    with open('/proc/meminfo') as f:
      memory = int(next(l for l in f if l.startswith('MemTotal:')).split()[1]) * 1024
  return {'memory': memory, 'open_files': resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def _free_disk(workdir: str) -> tuple[str, int]:
  """(the nearest existing folder of `workdir`, free bytes on its filesystem)."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path, shutil.disk_usage(path).free


def _bytes_under(path: str) -> int:
  """Bytes of the files under `path` (checkpoints a resumed population already holds)."""
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files if os.path.isfile(os.path.join(root, f)))


def _size(n: float) -> str:
  for unit in ('bytes', 'KB', 'MB', 'GB', 'TB'):
    if n < 1000 or unit == 'TB':
      return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
    n /= 1000


def check_cost(config, workdir: str, overrides: list[dict]) -> None:
  """Refuses, in one line, a population beyond what this machine can hold (memory, disk of
  the workdir's filesystem, open files), before any data is read or any folder made; config.
  sweep.allow_large=True goes ahead anyway."""
  if len(overrides) <= 1 or config.sweep.get('allow_large', False):
    return
  cost, have = estimate_cost(config, overrides), machine()
  where, free = _free_disk(workdir)
  beyond = []
  if cost.memory > MEMORY_SHARE * have['memory']:
    beyond.append(f'about {_size(cost.memory)} of memory (this machine has '
                  f'{_size(have["memory"])}, of which {MEMORY_SHARE:.0%} may be planned)')
  if cost.disk > free and cost.disk > free + _bytes_under(workdir):  # a resume's count too
    beyond.append(f'about {_size(cost.disk)} of disk for checkpoints ({_size(free)} free '
                  f'under {where})')
  if cost.largest_group > have['open_files'] - OPEN_FILES_SPARE:
    beyond.append(f'{cost.largest_group:,} open files at once (one per member of a group; '
                  f'the limit is {have["open_files"]:,}: ulimit -n)')
  if beyond:
    raise UserError(f'config.sweep declares {cost.members:,} members, which would need '
                    f'{" and ".join(beyond)}; sweep fewer members (or smaller models, a lower '
                    f'config.checkpoint_keep), or set config.sweep.allow_large=True to go '
                    f'ahead anyway')


# ---------------------------------------------------------------------------------------------
# Training


def train(config, workdir: str) -> dict:
  """Trains the population `config` declares in `workdir` (a single run without a sweep),
  resuming whatever was started; returns what results.json holds: for a population, the
  delivered model's figures and one record per member under 'members'
  (`pandas.DataFrame(results['members'])` tabulates them).
  """
  space = search.check_config(config)
  searching = config.search.kind != 'grid'
  if searching and (config.sweep.grid.strip() or config.sweep.members):
    raise UserError(f'config.search.kind={config.search.kind!r} searches one group of '
                    f'config.search.size slots; config.sweep.grid and config.sweep.members '
                    f'must be empty (search each structure in its own --workdir)')
  check_cost(config, workdir, [{'seed': i} for i in range(config.search.size)] if searching
             else override_sets(config))  # before any member is built
  # every member is checked before any work
  members = (search_steps.slot_members(config, workdir, space) if searching
             else members_of(config, workdir))
  extension = search_steps.extension(config, workdir, space)
  with signals.recorded(), workdir_lib.claim(workdir, exclusive=parallel.is_main_process()):
    return workdir_lib.as_json(_train(config, workdir, members, extension))


def _check_not_old_variants(workdir: str) -> None:
  """Ensembles of variants were written as workdir/variant<i>/ by an earlier digitjax."""
  if os.path.isdir(os.path.join(workdir, 'variant0')):
    raise UserError(f'--workdir={workdir} holds ensembles of variants (variant0/, ...) written '
                    f'by an earlier digitjax; they are populations now (members/<i>-<overrides>/'
                    f'): train again in a new --workdir')


def _train(config, workdir, members, extension) -> dict:
  parallel.check_cpu_layout(config.distributed.allow_several_cpu_devices)
  _check_not_old_variants(workdir)
  single = len(members) == 1 and members[0].name == 'base'
  files = workdir_lib.RunFiles.of(workdir)
  if single:
    record = workdir_lib.read_json(files.config, 'population config')
    if record and len(record.get('members', [])) > 1:
      raise UserError(f'--workdir={workdir} holds a population of {len(record["members"])} '
                      f'members; give its config.sweep, or use a new --workdir')
  else:
    _check_same_members(workdir, members)
    done = _finished_population(files, config, members)
    if done is not None:
      return done
  splits = data.load_splits(config)
  _check_sizes(config, members, splits)
  processes = jax.process_count()
  # A search's slots exchange states at its boundaries: they train together on every process
  # (data parallel) rather than dealt out to processes.
  shard = processes > 1 and not single and not isinstance(extension, search_steps.Search)
  mine = [m for m in members if not shard or m.index % processes == jax.process_index()]
  batch_sizes = {m.config.batch_size for m in members}
  n_train = len(splits.train['label'])
  log(f'{config.dataset}: {n_train} train, {len(splits.val["label"])} validation, '
      f'{len(splits.test["label"])} test examples'
      + (f'; {n_train // config.batch_size} steps of {config.batch_size} per epoch'
         if len(batch_sizes) == 1 else ''))
  if shard:
    log(f'{len(members)} members over {processes} processes: each trains its own')
  if not single and parallel.is_main_process():
    workdir_lib.write_json_atomic(files.config, _config_record(config, members))
  outcomes = []
  start = time.perf_counter()
  with loop.StopSignals() as stop:
    groups = groups_of(mine)
    for g, group in enumerate(groups):
      if not single:
        log(f'Group {g + 1}/{len(groups)}: {len(group)} member(s): '
            f'{", ".join(m.name for m in group)}')
      outcomes += _train_group(group, splits, stop, shard, single, extension)
  seconds = time.perf_counter() - start
  if single:
    outcome = outcomes[0]
    if config.plots and parallel.is_main_process() and outcome.test_logits is not None:
      signals.reached('plotting')
      from digitjax import report  # matplotlib is imported only when pictures are drawn
      report.draw_all(files.plots, splits, outcome.test_logits,
                      metrics_lib.read_history(files), data.first_images(config, splits))
    return outcome.results
  if shard:
    outcomes = _gather(outcomes, members, splits)
    if not parallel.is_main_process():
      return {}
  return summarize(config, workdir, outcomes, splits, seconds)


def _train_group(group, splits, stop, shard: bool, single: bool,
                 extension: loop.Extension) -> list[loop.Outcome]:
  cfg = group[0].config
  mesh = parallel.make_mesh(local=shard)
  parallel.check_divisible('batch_size', cfg.batch_size, mesh)
  choices = configlib.resolve(cfg, data_devices=parallel.data_size(mesh),
                              group_size=len(group))
  if choices.execution == 'vmap' and len(group) > 1:
    mesh = parallel.make_mesh(local=shard, members=_member_axis(len(group), mesh))
    parallel.check_divisible('batch_size', cfg.batch_size, mesh)
  log(model_lib.summary_table(model_lib.build_model(cfg.model)))
  if not single and (shard or parallel.is_main_process()):
    _make_member_folders(group)
  return loop.train_group(group, splits, mesh, choices, stop, loop.Part(
      process=jax.process_index() if shard else None, collective=not shard, logits=not single,
      extension=extension))


def _make_member_folders(group) -> None:
  """Each member's folder and config.json; a signal stops between two members."""
  for m in group:
    signals.check("while making the members' folders; the folders made so far are complete")
    os.makedirs(m.files.dir, exist_ok=True)
    workdir_lib.write_json_atomic(m.files.config, _config_record(m.config, [m]))


def _member_axis(group_size: int, mesh) -> int:
  """Devices along 'members' for a vmapped group: as many as divide both."""
  return math.gcd(group_size, mesh.devices.size)


def _check_sizes(config, members, splits) -> None:
  n_train = len(splits.train['label'])
  for m in members:
    spe = n_train // m.config.batch_size
    where = '' if m.name == 'base' else f'config.sweep member {m.index} ({m.name}): '
    if spe == 0:
      raise UserError(f'{where}batch_size={m.config.batch_size} exceeds the {n_train} '
                      f'training examples; lower config.batch_size')
    if configlib.total_steps(m.config.num_epochs, spe) < 1:
      raise UserError(f'{where}num_epochs={m.config.num_epochs} is less than one step of '
                      f'{m.config.batch_size} examples ({spe} steps per epoch); raise '
                      f'config.num_epochs')


def _config_record(config, members) -> dict:
  return {'config': config.to_dict(),
          'members': [{'index': m.index, 'name': m.name, 'overrides': m.overrides}
                      for m in members]}


def _check_same_members(workdir: str, members) -> None:
  """A workdir that holds another population is an error, never a mix of two."""
  record = workdir_lib.read_json(workdir_lib.RunFiles.of(workdir).config, 'population config')
  if record is None:
    if os.path.isdir(os.path.join(workdir, workdir_lib.CHECKPOINTS)):
      raise UserError(f'--workdir={workdir} holds a single run (trained without config.sweep); '
                      f'train the population in a new --workdir')
    return
  saved = [m.get('name') for m in record.get('members', [])]
  names = [m.name for m in members]
  if saved != names:
    differ = next((i for i, (a, b) in enumerate(zip(saved, names)) if a != b),
                  min(len(saved), len(names)))
    was = saved[differ] if differ < len(saved) else 'absent'
    now = names[differ] if differ < len(names) else 'absent'
    raise UserError(f'--workdir={workdir} holds another population ({len(saved)} members; '
                    f'member {differ} was {was}, now {now}); use a new --workdir, or the '
                    f'config it was trained with')


def _finished_population(files, config, members) -> dict | None:
  results = workdir_lib.read_json(files.results, 'results file')
  if not results or 'members' not in results:
    return None
  steps = {}
  for m in members:
    r = workdir_lib.read_results(m.files.results)
    if r is None:
      return None
    steps[m.name] = r.get('checkpoint_step')
  if not isinstance(results['members'], list) or not all(
      isinstance(r, dict) and 'name' in r for r in results['members']) or not all(
      isinstance(results.get(k), (int, float)) for k in workdir_lib.RESULT_KEYS[:2]):
    return None  # damaged: summarized again from the members
  recorded = {r['name']: r.get('checkpoint_step') for r in results['members']}
  if recorded != steps or _sweep_record(results.get('config', {}).get('sweep')) != (
      _sweep_record(workdir_lib.as_json(config.sweep.to_dict()))):
    return None
  log(f'Population of {len(members)} members already trained; results from {files.results}:')
  log(table(results))
  return results


def _sweep_record(sweep) -> dict | None:
  """The fields of config.sweep that make the population (allow_large only lets it start)."""
  return {k: v for k, v in sweep.items() if k != 'allow_large'} if isinstance(
      sweep, dict) else sweep


def _gather(outcomes, members, splits) -> list[loop.Outcome]:
  """Every member's outcome on every process: results from the shared workdir, logits by one
  all-gather (the only communication between the processes of a sharded population)."""
  from jax.experimental import multihost_utils
  parallel.barrier('digitjax:population-trained')
  per = -(-len(members) // jax.process_count())
  shape = lambda split: (per, len(split['label']), members[0].config.model.num_classes)
  gathered = {}
  for name, split in (('val', splits.val), ('test', splits.test)):
    mine = np.zeros(shape(split), np.float32)
    for k, o in enumerate(outcomes):
      logits = getattr(o, f'{name}_logits')
      if logits is not None and logits.size:
        mine[k] = logits
    gathered[name] = np.asarray(multihost_utils.process_allgather(mine))  # (P, per, N, C)
  result = []
  for m in members:
    p, k = m.index % jax.process_count(), m.index // jax.process_count()
    r = workdir_lib.read_results(m.files.results) or {}
    diverged = r.get('diverged_at_step') is not None
    result.append(loop.Outcome(m, r, metrics_lib.read_history(m.files),
                               None if diverged else gathered['val'][p, k],
                               None if diverged else gathered['test'][p, k]))
  return result


# ---------------------------------------------------------------------------------------------
# Selection and results


def select(outcomes: list[loop.Outcome], how: str, metric: str = 'val_accuracy') -> list[int]:
  """Indices of the members the population delivers, chosen on validation only: on `metric`
  (a search's fitness, config.search.metric; a grid's validation accuracy)."""
  valid = [i for i, o in enumerate(outcomes) if o.test_logits is not None]
  if not valid:
    raise UserError('every member of the population diverged (non-finite loss); lower '
                    'config.learning_rate')
  if how == 'ensemble':
    return valid
  score = lambda i: search.fitness(outcomes[i].results, metric)  # lower is better
  ranked = sorted(valid, key=lambda i: (score(i), i))
  top = SELECT_RE.match(how).group(2)
  return ranked[:int(top) if top else 1]


def selection_metric(config) -> str:
  """What a population's members are ranked by: a search's fitness, or validation accuracy."""
  return config.search.metric if config.search.kind != 'grid' else 'val_accuracy'


def selection_note(outcomes: list[loop.Outcome], how: str, chosen: list[int]) -> str | None:
  """What the delivered model lacks because members diverged (None: nothing): 'top3' with two
  of the three best diverged delivers one; 'ensemble' leaves the diverged out."""
  lost = [o.member.name for o in outcomes if o.test_logits is None]
  top = SELECT_RE.match(how).group(2)
  asked = len(outcomes) if how == 'ensemble' else int(top) if top else 1
  if not lost or len(chosen) >= asked:
    return None
  return (f'select={how} asked for {asked} members; {len(lost)} diverged '
          f'({", ".join(lost)}), so the delivered model combines {len(chosen)}: '
          f'{", ".join(outcomes[i].member.name for i in chosen)}')


def _member_record(o: loop.Outcome, selected: bool) -> dict:
  r, m = o.results, o.member
  best = max((h['val_accuracy'] for h in o.history
              if isinstance(h.get('val_accuracy'), float)), default=None)
  return {'index': m.index, 'name': m.name, 'overrides': m.overrides,
          'dir': os.path.relpath(m.files.dir, os.path.dirname(os.path.dirname(m.files.dir))),
          'best_val_accuracy': best, 'val_accuracy': r.get('val_accuracy'),
          'val_loss': r.get('val_loss'), 'test_accuracy': r.get('test_accuracy'),
          'test_loss': r.get('test_loss'), 'train_seconds': r.get('train_seconds'),
          'checkpoint_step': r.get('checkpoint_step'),
          'diverged_at_step': r.get('diverged_at_step'),
          'diverged_reason': r.get('diverged_reason'), 'selected': selected}


def summarize(config, workdir: str, outcomes: list[loop.Outcome], splits,
              train_seconds: float | None = None) -> dict:
  """The population's results.json, population.csv, console table and pictures."""
  chosen = select(outcomes, config.sweep.select, selection_metric(config))
  val = inference.classification_metrics(
      inference.combine_logits([outcomes[i].val_logits for i in chosen]), splits.val['label'])
  test_logits = inference.combine_logits([outcomes[i].test_logits for i in chosen])
  test = inference.classification_metrics(test_logits, splits.test['label'])
  note = selection_note(outcomes, config.sweep.select, chosen)
  ok = [o for o in outcomes if o.test_logits is not None]
  member_metrics = lambda split: [{'accuracy': o.results[f'{split}_accuracy'],
                                   'loss': o.results[f'{split}_loss']} for o in ok]
  results = {
      'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
      'val_accuracy': val['accuracy'], 'val_loss': val['loss'],
      'select': config.sweep.select, 'selected': [outcomes[i].member.name for i in chosen],
      **({'selection_note': note} if note else {}),
      **inference.member_summary('test', member_metrics('test')),
      **inference.member_summary('val', member_metrics('val')),
      'train_seconds': train_seconds if train_seconds is not None else sum(
          o.results.get('train_seconds') or 0.0 for o in outcomes),
      'cost': _cost(outcomes, train_seconds),
      'members': [_member_record(o, i in chosen) for i, o in enumerate(outcomes)],
      'devices': jax.device_count(), 'processes': jax.process_count(),
      'backend': jax.default_backend(), 'config': config.to_dict(),
  }
  log(f'Population of {len(outcomes)} members, select={config.sweep.select} '
      f'({", ".join(results["selected"])}): test loss {test["loss"]:.4f} - accuracy '
      f'{test["accuracy"]:.4f}')
  log(table(results))
  if note:
    log(f'Note: {note}')
  log(f'Cost: {results["cost"]["member_steps"]:,} member-steps, '
      f'{results["cost"]["device_seconds"]:.1f} device-seconds')
  if parallel.is_main_process():
    files = workdir_lib.RunFiles.of(workdir)
    if config.search.kind != 'grid':
      found = search_steps.write_found_config(workdir, results['members'][chosen[0]],
                                              outcomes[chosen[0]].results, config.search.kind)
      results['found_config'] = os.path.relpath(found, workdir)
      log(f'The delivered member\'s numbers as a single run: python launch.py --config={found} '
          f'--workdir=NEW_WORKDIR')
    workdir_lib.write_json_atomic(files.results, results)
    write_csv(files.path(workdir_lib.POPULATION_CSV), results, swept_fields(config))
    if config.plots:
      signals.reached('plotting')
      from digitjax import report  # matplotlib is imported only when pictures are drawn
      report.draw_population(files.plots, results, [o.history for o in outcomes],
                             swept_fields(config))
      report.draw_all(files.plots, splits, test_logits, _curves_of(outcomes, chosen),
                      data.first_images(config, splits))
  return results


def _cost(outcomes, train_seconds: float | None) -> dict:
  """What the population spent: every member's training steps (a diverged member's to its
  divergence; a search's slots all of theirs), and its seconds times the devices it held."""
  steps_of = lambda r: r.get('diverged_at_step') or r.get('checkpoint_step') or 0
  seconds = train_seconds if train_seconds is not None else sum(
      o.results.get('train_seconds') or 0.0 for o in outcomes)
  return {'member_steps': sum(steps_of(o.results) for o in outcomes),
          'device_seconds': seconds * jax.device_count()}


def _curves_of(outcomes, chosen) -> list[dict]:
  """The learning curves drawn in curves.png: the delivered member's (the first chosen)."""
  return outcomes[chosen[0]].history


def swept_fields(config) -> list[str]:
  """The fields the population varies, in the order they are declared."""
  fields = []
  for text in config.sweep.members:
    fields += [k for k in parse_overrides(text, 'config.sweep.members') if k not in fields]
  fields += [k for k, _ in parse_grid(config.sweep.grid) if k not in fields]
  return fields


def write_csv(path: str, results: dict, fields: list[str]) -> None:
  columns = (['index', 'name'] + fields + [
      'best_val_accuracy', 'val_accuracy', 'val_loss', 'test_accuracy', 'test_loss',
      'train_seconds', 'checkpoint_step', 'diverged_at_step', 'selected'])
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(columns)
  for m in results['members']:
    row = {**m, **{f: format_value(m['overrides'].get(f, '')) for f in fields}}
    writer.writerow(['' if row.get(c) is None else row.get(c) for c in columns])
  with workdir_lib.written_aside(path) as tmp, open(tmp, 'w') as f:
    f.write(buffer.getvalue())


def table(results: dict) -> str:
  """The members as a table, best validation accuracy first."""
  fmt = lambda x: '-' if x is None else f'{x:.4f}'
  rows = sorted(results['members'], key=lambda m: (-(m['val_accuracy'] or -1), m['index']))
  width = max(12, *(len(m['name']) for m in rows)) + 2
  lines = [f'{"member":<{width}}{"val_acc":>9}{"best_val":>10}{"val_loss":>10}{"test_acc":>10}'
           f'{"test_loss":>11}{"train_s":>9}']
  for m in rows:
    mark = ' *' if m['selected'] else ''
    note = (f'  diverged at step {m["diverged_at_step"]}' + (
        f' ({m["diverged_reason"]})' if m.get('diverged_reason') else '')
            if m['diverged_at_step'] else '')
    seconds = '-' if m['train_seconds'] is None else f'{m["train_seconds"]:.1f}'
    lines.append(f'{m["name"]:<{width}}{fmt(m["val_accuracy"]):>9}'
                 f'{fmt(m["best_val_accuracy"]):>10}{fmt(m["val_loss"]):>10}'
                 f'{fmt(m["test_accuracy"]):>10}{fmt(m["test_loss"]):>11}{seconds:>9}'
                 f'{mark}{note}')
  lines.append(f'(* delivered: select={results["select"]}; test_accuracy '
               f'{results["test_accuracy"]:.4f}, test_loss {results["test_loss"]:.4f})')
  return '\n'.join(lines)
