"""A population's members: declared by config.sweep, built from the base config, grouped by
structure, and chosen on validation. Training (loop, population) and the modes (eval, predict,
report, export) find a workdir's members here, the same way.

config.sweep declares the members (configs/default.py documents the syntax):
- `grid`: 'field=v1,v2,...; field=v1,...' -> every combination, in the order written;
- `members`: override sets, each 'field=value; field=value' ('' = the config as it is);
  with a grid, each set is combined with every grid point;
- `select`: what the population delivers: 'best' (by validation accuracy), 'ensemble' (the mean
  probabilities of all members) or 'top<k>' (of the k best by validation accuracy).
Members share the data and its validation holdout (that of the base config's seed). A config
without a sweep is a population of one member, the config itself, trained in the workdir
itself (`Member.alone`).
"""
from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import math
import re
from typing import Any

import numpy as np

from digitjax import configlib, signals
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError


@dataclasses.dataclass
class Member:
  """One model of a population: the base config plus `overrides`."""
  index: int
  name: str              # its overrides as text ('learning_rate=0.01,seed=0'), or 'base'
  overrides: dict        # field -> value
  config: Any            # the effective ConfigDict
  files: workdir_lib.RunFiles

  @property
  def is_base(self) -> bool:
    """Whether it is the base config as it is (no overrides): no member is named in its lines
    and errors."""
    return not self.overrides

  @property
  def alone(self) -> bool:
    """Whether it is a whole run: the config of a workdir trained without a sweep, whose files
    are the workdir's own (a population's members each have a folder under members/)."""
    return self.files == workdir_lib.RunFiles.of(self.files.dir)

  @property
  def label(self) -> str:
    """'[name] ' before its lines, or nothing for the base config (no overrides)."""
    return '' if self.is_base else f'[{self.name}] '

  @property
  def where(self) -> str:
    """'config.sweep member INDEX (NAME): ' before its errors, or nothing for the base config."""
    return '' if self.is_base else f'config.sweep member {self.index} ({self.name}): '


@dataclasses.dataclass
class Outcome:
  """How a member's training ended: its results.json record, its per-epoch records (the
  learning curves) and, for the population's selection, its logits on the validation and test
  splits."""
  member: Member
  results: dict
  history: list[dict]
  val_logits: np.ndarray | None = None
  test_logits: np.ndarray | None = None
  state: Any = None


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
  """Each member's overrides, in order, parsed from config.sweep (nothing is built), once
  `config` is checked (configlib.validate: the one check of the base config)."""
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


def members_of(config, workdir: str, overrides: list[dict] | None = None) -> list[Member]:
  """The members `config` declares, each checked; a UserError names the first bad one.
  `overrides`: override_sets(config), when the caller has them already (the sweep is parsed,
  and the base config checked, once)."""
  overrides = override_sets(config) if overrides is None else overrides
  if config.search.kind != 'grid':
    return search_slots(config, workdir)
  if overrides == [{}]:  # no sweep: the config itself, in the workdir itself
    return [Member(0, 'base', {}, config, workdir_lib.RunFiles.of(workdir))]
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
    members.append(Member(i, name, chosen, member, workdir_lib.member_files(workdir, i, name)))
  _check_select(config.sweep.select, len(members), config.validation_fraction)
  return members


def search_slots(config, workdir: str) -> list[Member]:
  """A search's slots (config.search.kind 'pbt' or 'halving'): slot i is the base config with
  seed + i (its initial parameters and example order) in members/NN-slotN/, sharing the base
  config's holdout; the numbers each starts with are the search's (plan._first_proposals)."""
  split_seed = configlib.split_seed(config)
  slots = []
  for i in range(config.search.size):
    member = config.copy_and_resolve_references()
    member.seed, member.data.split_seed = config.seed + i, split_seed
    name = f'slot{i}'
    slots.append(Member(i, name, {'seed': member.seed}, member,
                        workdir_lib.member_files(workdir, i, name)))
  _check_select(config.sweep.select, len(slots), config.validation_fraction)
  return slots


def _check_select(select: str, size: int, validation_fraction: float) -> None:
  top = SELECT_RE.match(select).group(2)
  if top and int(top) > size:
    raise UserError(f'config.sweep.select={select!r} asks for more members than the population '
                    f'has ({size})')
  if size > 1 and select != 'ensemble' and validation_fraction == 0:
    raise UserError(f"config.sweep.select={select!r} chooses by validation accuracy, and "
                    f"config.validation_fraction=0 leaves no validation split; hold some out, "
                    f"or use select='ensemble'")


def swept_fields(members: list[Member]) -> list[str]:
  """The fields the population varies, in the order config.sweep declares them: those only some
  members set (config.sweep.members'), in the order they first appear, then those every member
  sets (the grid's axes), in the first member's order."""
  every = [k for k in members[0].overrides if all(k in m.overrides for m in members)]
  some = []
  for m in members:
    some += [k for k in m.overrides if k not in every and k not in some]
  return some + every


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


def groups_of(members: list[Member]) -> list[list[Member]]:
  """Members that can share a program, in the order of their first member."""
  groups: dict[str, list] = {}
  for m in members:
    groups.setdefault(group_key(m.config), []).append(m)
  return list(groups.values())


# ---------------------------------------------------------------------------------------------
# Selection


def select(outcomes: list[Outcome], how: str, metric: str = 'val_accuracy') -> list[int]:
  """Indices of the members the population delivers, chosen on validation only: on `metric`
  ('val_accuracy', higher better, or a search's 'val_loss', lower better)."""
  valid = [i for i, o in enumerate(outcomes) if o.test_logits is not None]
  if not valid:
    raise UserError('every member of the population diverged (non-finite loss); lower '
                    'config.learning_rate')
  if how == 'ensemble':
    return valid
  sign = -1 if metric == 'val_accuracy' else 1
  value = lambda i: outcomes[i].results.get(metric)
  ranked = sorted(valid, key=lambda i: (
      sign * value(i) if isinstance(value(i), (int, float)) and math.isfinite(value(i))
      else math.inf, i))  # none or not finite (a search's slot whose loss blew up): last
  top = SELECT_RE.match(how).group(2)
  return ranked[:int(top) if top else 1]


def selection_metric(config) -> str:
  """What a population's members are ranked by: a search's metric, else validation accuracy."""
  return config.search.metric if config.search.kind != 'grid' else 'val_accuracy'


def selection_note(outcomes: list[Outcome], how: str, chosen: list[int]) -> str | None:
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
