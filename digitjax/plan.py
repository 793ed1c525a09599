"""A config turned, once, into what training needs: the plan (`make`) and each member's recipe
(`recipe`), so that the rooms below the orchestrator (population.py) take plain values, never
the config again.

`make`, before any work: the base config checked and its sweep parsed (members.override_sets),
its search checked (search.check_config), the population sized and refused if this machine
cannot hold it (check_cost), every member built and checked (members.members_of; a search's
slots with their first proposals), and what the orchestrator and the search's steps need of the
config as plain values: the search's settings (SearchPlan), the selection, the records.

`recipe`, once a group's steps per epoch and 'auto' choices are known (after the data is read and
the group's mesh made): what the loop needs of one member (its step's spec and numbers, its
models, the fields a checkpoint must share with it, its sizes and seed).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import shutil
from typing import Any

import jax
import numpy as np

from digitjax import checkpoint as ckpt_lib, configlib, members as members_lib
from digitjax import model as model_lib, search, signals, steps
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError
from digitjax.members import Member


@dataclasses.dataclass(frozen=True)
class SearchPlan:
  """config.search as the search's steps take it (search_steps.extension), in plain values."""
  kind: str                    # 'grid' | 'halving' | 'pbt'
  space: tuple                 # search.Dimension, one per searched field
  ready_steps: int
  metric: str
  sampler: str
  eta: int
  pbt: search.PbtSettings | None
  schedule: list | None        # config.search.schedule's segments, if it is set (a single run)
  identity: dict               # what makes the search: another's checkpoints are not resumed
  seed: int
  plots: bool


@dataclasses.dataclass
class Plan:
  """What population.train needs of a config, made once (`make`)."""
  config: Any                  # the base config, checked (data.load_splits reads its fields)
  members: list[Member]        # each with its effective config, checked
  search: SearchPlan
  select: str                  # config.sweep.select
  metric: str                  # what members are ranked by (members.selection_metric)
  sweep: dict                  # config.sweep as results.json records it
  record: dict                 # the population's config.json
  plots: bool


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What the loop needs of one member, in plain values (`recipe`)."""
  spec: steps.StepSpec
  hyper: steps.Hyper
  eval_model: Any              # evaluation's formulation (choices.eval_conv_impl, ...); the
  #                              training step's is spec.model (choices.conv_impl, ...)
  choices: configlib.Choices | None
  resume: dict                 # checkpoint.resume_fields: what its checkpoints must share
  seed: int
  batch_size: int
  chunk_steps: int
  eval_batch_size: int
  checkpoint_keep: int
  log_every_steps: int
  num_epochs: float
  num_classes: int


def recipe(config, steps_per_epoch: int, choices: configlib.Choices | None = None) -> Recipe:
  """Member `config`'s recipe for a group whose steps per epoch and 'auto' choices are these
  (without choices, the model's default formulations: what sizes a state)."""
  train_impl = (choices.conv_impl, choices.pool_impl) if choices else ()
  eval_impl = (choices.eval_conv_impl, choices.eval_pool_impl) if choices else ()
  model = model_lib.build_model(config.model, *train_impl)
  eval_model = model_lib.build_model(config.model, *eval_impl)
  resume = ckpt_lib.resume_fields(config.to_dict())
  spec = steps.spec(config, model, steps_per_epoch, choices.grad_chunks if choices else 1)
  return Recipe(
      spec=spec, hyper=steps.hyper(config, steps_per_epoch), eval_model=eval_model,
      choices=choices, resume=resume, seed=config.seed,
      batch_size=config.batch_size, chunk_steps=config.chunk_steps,
      eval_batch_size=config.eval_batch_size, checkpoint_keep=config.checkpoint_keep,
      log_every_steps=config.log_every_steps, num_epochs=config.num_epochs,
      num_classes=configlib.DATASET_LABELS[config.dataset])


def make(config, workdir: str) -> Plan:
  """The plan of `config` in `workdir`: every check made before any work (a UserError names the
  first bad field or member); nothing is read but the machine's sizes, nothing written."""
  overrides = members_lib.override_sets(config)  # the config checked, its sweep parsed: once
  space = search.check_config(config)
  searching = config.search.kind != 'grid'
  if searching and overrides != [{}]:
    raise UserError(f'config.search.kind={config.search.kind!r} searches one group of '
                    f'config.search.size slots; config.sweep.grid and config.sweep.members '
                    f'must be empty (search each structure in its own --workdir)')
  check_cost(config, workdir, [{'seed': i} for i in range(config.search.size)] if searching
             else overrides)  # before any member is built
  members = members_lib.members_of(config, workdir, overrides)  # all checked before any work
  if searching:
    _first_proposals(members, space, config.seed, config.search.sampler)
  record = {'config': config.to_dict(),
            'members': [{'index': m.index, 'name': m.name, 'overrides': m.overrides}
                        for m in members]}
  return Plan(config=config, members=members, sweep=workdir_lib.as_json(config.sweep.to_dict()),
              search=_search_plan(config, space), select=config.sweep.select,
              metric=members_lib.selection_metric(config), record=record, plots=config.plots)


def _first_proposals(slots: list[Member], space, seed: int, sampler: str) -> None:
  """A search's slots (members.search_slots) take the search's first proposals, checked."""
  firsts = search.initial_params(space, len(slots), seed, sampler)
  for slot, params in zip(slots, firsts):
    for key, value in params.items():
      configlib.set_field(slot.config, key, value)
    configlib.validate(slot.config)


def _search_plan(config, space) -> SearchPlan:
  s = config.search
  pbt = (search.PbtSettings(s.quantile, s.resample_probability, tuple(s.perturb), config.seed)
         if s.kind == 'pbt' else None)
  identity = workdir_lib.as_json({k: v for k, v in s.to_dict().items() if k != 'schedule'})
  return SearchPlan(kind=s.kind, space=space, ready_steps=s.ready_steps, metric=s.metric,
                    sampler=s.sampler, eta=s.eta, pbt=pbt,
                    schedule=search.parse_schedule(s.schedule) if s.schedule else None,
                    identity=identity, seed=config.seed, plots=config.plots)


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
    if structural:  # the base config itself is checked already
      configlib.validate(cfg)
  except UserError:
    return 0
  r = recipe(cfg, 1)
  shapes = jax.eval_shape(functools.partial(steps.init_state, r.spec, r.hyper),
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
  classes = configlib.DATASET_LABELS[config.dataset]
  logits = (n_val + n_test) * classes * 4  # float32, kept for the selection
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
    return  # one member is the run asked for: there is no population to size
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
