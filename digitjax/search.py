"""Hyperparameter search inside a population: what the loop decides between compiled calls.

config.search (configs/default.py documents the fields) chooses the kind:
- 'grid': the members config.sweep declares, trained to the end (population.py);
- 'halving': successive halving by ASHA's rule in a fixed number of slots: a member that
  reaches a rung (ready_steps, ready_steps*eta, ...) goes on while it is in the best 1/eta of
  every member that ever reached that rung; a culled slot is refilled with a new proposal;
- 'pbt': population-based training (Jaderberg et al. 2017): every ready_steps, the bottom
  fraction of the members copies the weights and hyperparameters of a member drawn from the
  top fraction, then explores (each field perturbed, or resampled from its prior).
New hyperparameters come from an optuna sampler ('tpe' or 'random') over an in-memory study
rebuilt from the finished trials, so nothing of optuna's is kept between calls.

Every function here is pure: the same inputs give the same decisions, bit for bit, so that a
run killed and resumed decides as the run that was killed would have. All randomness comes from
np.random.SeedSequence([seed, generation, salt]), one salt per use.

A search leaves two files beside its members: lineage.jsonl (one JSON record per event: who
copied whom, who was culled, with which hyperparameters) and an optuna study in SQLite for
`optuna-dashboard sqlite:///PATH`, rewritten whole each time (never half a study). A pbt search
also writes each member's schedule ('0: learning_rate=0.01; 1200: learning_rate=0.012'), which
config.search.schedule replays in a single run.

optuna is imported inside the functions that use it (it takes a while to import).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import warnings

import numpy as np

from digitjax import configlib
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError

KINDS = ('grid', 'halving', 'pbt')
SAMPLERS = ('tpe', 'random')
METRICS = ('val_loss', 'val_accuracy')
DISTRIBUTIONS = ('uniform', 'loguniform')
# The numbers the compiled step takes as arrays (configlib.MEMBER_NUMERIC_FIELDS less seed and
# warmup, which a member's run cannot change halfway).
SEARCHABLE = ('learning_rate', 'momentum', 'weight_decay', 'onecycle_pct_start',
              'augment.rotation', 'augment.zoom', 'augment.shift', 'label_smoothing',
              'model.dropout_rate')
# Each searchable field's own range (configlib's checks): a space's bounds and a schedule's
# values must lie in it.
LIMITS = {
    'learning_rate': (lambda v: v > 0, 'positive'),
    'momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'weight_decay': (lambda v: v >= 0, '0 or positive'),
    'onecycle_pct_start': (lambda v: 0 < v < 1, 'in (0, 1)'),
    'augment.rotation': (lambda v: 0 <= v <= 180, 'in [0, 180] degrees'),
    'augment.zoom': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'augment.shift': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'model.dropout_rate': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'label_smoothing': (lambda v: 0 <= v < 1, 'in [0, 1)'),
}
# The salts of the seed sequences, one per use of randomness.
_SALT_PROPOSE, _SALT_DONOR, _SALT_EXPLORE = 1, 2, 3
_MISSING = object()


def _rng(seed: int, generation: int, salt: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, generation, salt]))


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _searchable(where: str, item: str, field: str) -> None:
  if field not in SEARCHABLE:
    raise UserError(f'{where}: {item!r}: {field} is not a searchable field; search one of '
                    f'{", ".join(SEARCHABLE)}')


def _within_limits(where: str, item: str, field: str, value: float) -> None:
  ok, expected = LIMITS[field]
  if not ok(value):
    raise UserError(f'{where}: {item!r}: {field} must be {expected}; {value!r} is not')


# ---------------------------------------------------------------------------------------------
# The space


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One searched field and its prior: uniform, or log-uniform (uniform in log space)."""
  field: str
  distribution: str  # 'uniform' | 'loguniform'
  low: float
  high: float

  @property
  def log(self) -> bool:
    return self.distribution == 'loguniform'

  def sample(self, rng: np.random.Generator) -> float:
    """A value drawn from the prior."""
    if self.log:
      return self.clip(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
    return self.clip(rng.uniform(self.low, self.high))

  def clip(self, value: float) -> float:
    return float(min(max(float(value), self.low), self.high))

  def contains(self, value) -> bool:
    return _number(value) and self.low <= value <= self.high


_DIMENSION_RE = re.compile(r'^([^=\s]+)\s*=\s*(\w+)\s*\(([^,()]*),([^,()]*)\)$')


def _dimension(item: str) -> Dimension:
  where = 'config.search.space'
  match = _DIMENSION_RE.match(item)
  if not match:
    raise UserError(f"{where}: {item!r} is not field=distribution(low,high) (e.g. "
                    f"'learning_rate=loguniform(1e-3,0.3)'; several separated by ';')")
  field, distribution, low, high = match.groups()
  _searchable(where, item, field)
  if distribution not in DISTRIBUTIONS:
    raise UserError(f"{where}: {item!r}: {distribution} is not a distribution; use uniform or "
                    f"loguniform")
  try:
    low, high = float(low), float(high)
  except ValueError:
    raise UserError(f'{where}: {item!r}: the bounds must be numbers (e.g. '
                    f'{field}={distribution}(0.001,0.3))') from None
  if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
    raise UserError(f'{where}: {item!r}: the bounds must be finite with low < high; swap or '
                    f'widen them')
  if distribution == 'loguniform' and low <= 0:
    raise UserError(f'{where}: {item!r}: loguniform needs low > 0; raise low or use uniform')
  for value in (low, high):
    _within_limits(where, item, field, value)
  return Dimension(field, distribution, low, high)


def parse_space(text: str) -> tuple[Dimension, ...]:
  """'learning_rate=loguniform(1e-3,0.3); momentum=uniform(0.8,0.99)' -> the Dimensions, in
  the order written. Each bound must lie in its field's own range (LIMITS). An empty text is
  an empty space (check_config refuses it where a search needs one)."""
  space = []
  for item in filter(None, (part.strip() for part in text.split(';'))):
    dim = _dimension(re.sub(r'\s+', '', item))
    if dim.field in (d.field for d in space):
      raise UserError(f'config.search.space: {dim.field} is searched twice; keep one of them')
    space.append(dim)
  return tuple(space)


# ---------------------------------------------------------------------------------------------
# The config


def _fraction_ok(v) -> bool:
  return _number(v) and 0 < v <= 0.5


def _perturb_ok(v) -> bool:
  return isinstance(v, (tuple, list)) and len(v) == 2 and all(_number(f) and f > 0 for f in v)


# (field, ok, expected, the kinds that read it: None for every kind)
_CHECKS = (
    ('kind', lambda v: v in KINDS, "'grid', 'halving' or 'pbt'", None),
    ('sampler', lambda v: v in SAMPLERS, "'tpe' or 'random'", None),
    ('metric', lambda v: v in METRICS, "'val_loss' or 'val_accuracy'", None),
    ('space', lambda v: isinstance(v, str), "a string such as "
     "'learning_rate=loguniform(1e-3,0.3); momentum=uniform(0.8,0.99)'", None),
    ('schedule', lambda v: isinstance(v, str), "a string such as "
     "'0: learning_rate=0.01, momentum=0.9; 1200: learning_rate=0.012'", None),
    ('ready_steps', lambda v: _int(v) and v > 0, 'a positive number of steps',
     ('halving', 'pbt')),
    ('size', lambda v: _int(v) and v >= 2, 'an integer >= 2 (slots trained at once)',
     ('halving', 'pbt')),
    ('quantile', _fraction_ok, 'in (0, 0.5]', ('pbt',)),
    ('resample_probability', lambda v: _number(v) and 0 <= v <= 1, 'in [0, 1]', ('pbt',)),
    ('perturb', _perturb_ok, 'a pair of positive factors, e.g. (0.8, 1.2)', ('pbt',)),
    ('eta', lambda v: _int(v) and v >= 2, 'an integer >= 2', ('halving',)),
)


def _check_fields(config) -> None:
  for field, ok, expected, kinds in _CHECKS:
    value = configlib.get(config, f'search.{field}', _MISSING)
    if value is _MISSING:
      raise UserError(f'config.search.{field} is missing; every config has it '
                      f'(configs/default.py)')
    if (kinds is None or config.search.kind in kinds) and not ok(value):
      raise UserError(f'config.search.{field} is {value!r}, expected {expected}')


def _check_augment(enabled: bool, fields, where: str) -> None:
  """`fields` of augmentation searched or scheduled need it `enabled` (config.augment.enabled)."""
  augmented = [f for f in fields if f.startswith('augment.')]
  if augmented and not enabled:
    raise UserError(f'{where} sets {augmented[0]} but config.augment.enabled=False; set '
                    f'config.augment.enabled=True to search {augmented[0]}')


def check_config(config) -> tuple[Dimension, ...]:
  """Validates config.search as a whole (before any work) and returns its parsed space (empty
  for a grid). A schedule replays one run's hyperparameters: only with kind='grid'."""
  _check_fields(config)
  s = config.search
  space = parse_space(s.space)
  if s.kind == 'grid' and space:
    raise UserError("config.search.space is set but config.search.kind='grid'; set "
                    "kind='pbt' or 'halving'")
  if s.kind != 'grid' and not space:
    raise UserError(f"config.search.kind={s.kind!r} needs config.search.space; set e.g. "
                    f"space='learning_rate=loguniform(1e-3,0.3); momentum=uniform(0.8,0.99)'")
  if s.kind != 'grid' and s.schedule.strip():
    raise UserError(f"config.search.schedule replays a single run, and config.search.kind="
                    f"{s.kind!r} searches; set schedule='' or kind='grid'")
  augment = configlib.get(config, 'augment.enabled', False)
  _check_augment(augment, [d.field for d in space], 'config.search.space')
  schedule = parse_schedule(s.schedule)
  _check_augment(augment, [f for _, params in schedule for f in params],
                 'config.search.schedule')
  return space


def fitness(record: dict, metric: str) -> float:
  """A member's fitness from its evaluation record, lower better: val_loss as it is,
  val_accuracy negated; a missing or non-finite figure (a diverged member) is +inf."""
  if metric not in METRICS:
    raise UserError(f"config.search.metric is {metric!r}, expected 'val_loss' or "
                    f"'val_accuracy'")
  value = record.get(metric)
  if not _number(value):
    return math.inf
  return float(value) if metric == 'val_loss' else -float(value)


def _finite_or_inf(value) -> float:
  return float(value) if _number(value) else math.inf


# ---------------------------------------------------------------------------------------------
# Trials and proposals


@dataclasses.dataclass
class Trial:
  """One trial of the study: a member (halving) or one segment of a member between two
  exploits (pbt). `value` is the fitness at its end (lower better, +inf for a diverged one)."""
  number: int
  slot: int
  params: dict
  start_step: int
  end_step: int | None = None
  value: float | None = None
  parent: int | None = None  # the trial it was cloned from (pbt)
  intermediate: dict = dataclasses.field(default_factory=dict)  # step -> fitness
  state: str = 'running'  # 'running' | 'complete' | 'pruned'

  @property
  def finished(self) -> bool:
    return self.state in ('complete', 'pruned') and self.value is not None

  def to_json(self) -> dict:
    """A JSON object (steps as string keys, +inf as null: plain JSON)."""
    record = dataclasses.asdict(self)
    record['intermediate'] = {str(k): v for k, v in sorted(self.intermediate.items())}
    return workdir_lib.as_json(record)

  @classmethod
  def from_json(cls, d: dict) -> Trial:
    """The inverse of to_json: a finished trial's null value is +inf again."""
    finished = d.get('state') in ('complete', 'pruned')
    value = d.get('value')
    value = _finite_or_inf(value) if value is not None or finished else None
    return cls(number=int(d['number']), slot=int(d['slot']), params=dict(d['params']),
               start_step=int(d['start_step']), end_step=d.get('end_step'), value=value,
               parent=d.get('parent'),
               intermediate={int(k): _finite_or_inf(v)
                             for k, v in d.get('intermediate', {}).items()},
               state=d.get('state', 'running'))


def _fits(trial: Trial, space) -> bool:
  """Whether the trial's parameters cover the space, each within its bounds (a trial of
  another space is left out of the study)."""
  return all(dim.contains(trial.params.get(dim.field)) for dim in space)


@contextlib.contextmanager
def _quiet_optuna():
  """optuna, its INFO logs silenced and its ExperimentalWarnings ignored inside the block."""
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    yield optuna


def _distributions(optuna, space) -> dict:
  return {dim.field: optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log)
          for dim in space}


def _frozen(optuna, trial: Trial, space, value: float, user_attrs: dict | None = None):
  """The optuna FrozenTrial of a finished Trial, with `value` as its objective."""
  states = {'complete': optuna.trial.TrialState.COMPLETE,
            'pruned': optuna.trial.TrialState.PRUNED}
  intermediate = {int(k): float(v) for k, v in trial.intermediate.items()}
  return optuna.trial.create_trial(
      state=states[trial.state], value=value,
      params={dim.field: float(trial.params[dim.field]) for dim in space},
      distributions=_distributions(optuna, space), intermediate_values=intermediate,
      user_attrs=user_attrs)


def _sampler(optuna, sampler: str, seed: int, generation: int):
  state = int(np.random.SeedSequence([seed, generation, _SALT_PROPOSE]).generate_state(1)[0])
  if sampler == 'tpe':
    return optuna.samplers.TPESampler(seed=state)
  if sampler == 'random':
    return optuna.samplers.RandomSampler(seed=state)
  raise UserError(f"config.search.sampler is {sampler!r}, expected 'tpe' or 'random'")


def propose(space, history: list[Trial], n: int, seed: int, generation: int,
            sampler: str) -> list[dict]:
  """`n` new hyperparameter dicts (field -> float) from the sampler, over an in-memory study of
  `history`'s finished trials (minimizing fitness); the same arguments give the same dicts.
  TPE proposes at random until the study holds 10 finished trials."""
  if n <= 0:
    return []
  with _quiet_optuna() as optuna:
    study = optuna.create_study(direction='minimize',
                                sampler=_sampler(optuna, sampler, seed, generation))
    study.add_trials([_frozen(optuna, t, space, t.value) for t in history
                      if t.finished and _fits(t, space)])
    distributions = _distributions(optuna, space)
    proposals = []
    for _ in range(n):
      params = study.ask(distributions).params
      proposals.append({dim.field: dim.clip(params[dim.field]) for dim in space})
  return proposals


def initial_params(space, n: int, seed: int, sampler: str) -> list[dict]:
  """The first generation's hyperparameters: `n` proposals with no history."""
  return propose(space, [], n, seed, 0, sampler)


# ---------------------------------------------------------------------------------------------
# Population-based training


@dataclasses.dataclass(frozen=True)
class PbtSettings:
  """config.search's pbt fields, and the run's seed."""
  quantile: float
  resample_probability: float
  perturb: tuple
  seed: int

  @classmethod
  def of(cls, config) -> PbtSettings:
    s = config.search
    return cls(float(s.quantile), float(s.resample_probability),
               tuple(float(f) for f in s.perturb), int(config.seed))


@dataclasses.dataclass(frozen=True)
class Copy:
  """An exploit: `slot` takes `donor`'s weights, then the `new` hyperparameters (`old` were
  its own)."""
  slot: int
  donor: int
  old: dict
  new: dict


def explore(params: dict, space, rng: np.random.Generator, settings: PbtSettings) -> dict:
  """`params` explored: each field of the space, in order, resampled from its prior with
  probability resample_probability, else multiplied by one of the perturb factors (each with
  probability 1/2); clipped to its bounds. Fields outside the space are kept as they are."""
  new = dict(params)
  for dim in space:
    if rng.random() < settings.resample_probability:
      new[dim.field] = dim.sample(rng)
    else:
      factor = settings.perturb[int(rng.integers(2))]
      new[dim.field] = dim.clip(params[dim.field] * factor)
  return new


def pbt_step(scores: list[float], params: list[dict], space, generation: int,
             settings: PbtSettings) -> list[Copy]:
  """One exploit-and-explore of a population (scores lower better, +inf for a diverged
  member), ranked by (score, slot). Each of the bottom k = max(1, floor(K*quantile)) copies a
  donor drawn uniformly from the top k, one draw per bottom slot in slot order, then explores
  the donor's hyperparameters. A diverged member is never a donor and always copies (with
  more than K-k diverged, the bottom holds them all and the donors are the top k's finite
  ones; with none finite, nobody copies). Returns the copies by slot."""
  size = len(scores)
  k = max(1, math.floor(size * settings.quantile))
  if size < 2:
    return []
  if 2 * k > size:
    raise ValueError(f'quantile {settings.quantile} > 0.5: the top and the bottom overlap')
  keys = [_finite_or_inf(s) for s in scores]
  order = sorted(range(size), key=lambda i: (keys[i], i))
  top = [i for i in order[:k] if math.isfinite(keys[i])]
  bottom = sorted(set(order[size - k:]) | {i for i in range(size) if not math.isfinite(keys[i])})
  if not top:
    return []
  donor_rng = _rng(settings.seed, generation, _SALT_DONOR)
  donors = [top[int(donor_rng.integers(len(top)))] for _ in bottom]
  explore_rng = _rng(settings.seed, generation, _SALT_EXPLORE)
  return [Copy(slot, donor, dict(params[slot]),
               explore(params[donor], space, explore_rng, settings))
          for slot, donor in zip(bottom, donors)]


# ---------------------------------------------------------------------------------------------
# Successive halving


def rungs(first: int, eta: int, last: int) -> list[int]:
  """The members' ages (steps) at which they are judged: first, first*eta, ... up to last."""
  if first <= 0 or eta < 2:
    raise ValueError(f'rungs need first > 0 and eta >= 2, got first={first}, eta={eta}')
  ages = []
  while first <= last:
    ages.append(first)
    first *= eta
  return ages


def halving_step(ages: list[int], scores: list[float], record: dict, eta: int,
                 rung_ages: list[int]) -> list[int]:
  """ASHA's rule in fixed slots; returns the slots to cull (and refill), in slot order.

  `record` maps a rung (an int age) to the fitness of every member that ever reached it, in
  arrival order; it is updated in place (the caller keeps it). Every slot whose age is one of
  `rung_ages` arrives there now: all arrivals are appended first (in slot order), then each is
  judged: it goes on if its rank among the rung's record (ties: the earlier arrival first) is
  below max(1, len // eta), and a diverged (non-finite) member never goes on. The last rung is
  the end of a member's budget: it culls nobody. Call once per age a slot reaches.
  """
  rung_set = set(rung_ages)
  top = max(rung_ages, default=None)
  arrived = [slot for slot, age in enumerate(ages) if age in rung_set]
  positions = {}
  for slot in arrived:
    entries = record.setdefault(ages[slot], [])
    positions[slot] = len(entries)
    entries.append(_finite_or_inf(scores[slot]))
  cull = []
  for slot in arrived:
    if ages[slot] == top:
      continue
    entries = [_finite_or_inf(v) for v in record[ages[slot]]]
    mine = (entries[positions[slot]], positions[slot])
    rank = sum((value, j) < mine for j, value in enumerate(entries))
    if rank >= max(1, len(entries) // eta) or not math.isfinite(mine[0]):
      cull.append(slot)
  return cull


# ---------------------------------------------------------------------------------------------
# Schedules


def _segment(item: str, where: str) -> tuple[int, dict]:
  step, sep, body = item.partition(':')
  step = step.strip()
  if not sep or not re.fullmatch(r'\d+', step) or not body.strip():
    raise UserError(f"{where}: {item!r} is not 'step: field=value, ...' (e.g. '0: "
                    f"learning_rate=0.01, momentum=0.9; 1200: learning_rate=0.012')")
  params = {}
  for part in body.split(','):
    field, sep, value = (s.strip() for s in part.partition('='))
    if not sep or not field:
      raise UserError(f'{where}: {item!r}: {part.strip()!r} is not field=value (e.g. '
                      f'learning_rate=0.01)')
    _searchable(where, item, field)
    try:
      number = float(value)
    except ValueError:
      number = math.nan
    if not math.isfinite(number):
      raise UserError(f'{where}: {item!r}: {field}={value} is not a finite number; write one '
                      f'like 0.01')
    if field in params:
      raise UserError(f'{where}: {item!r}: {field} is set twice; keep one of them')
    _within_limits(where, item, field, number)
    params[field] = number
  return int(step), params


def parse_schedule(text: str) -> list[tuple[int, dict]]:
  """'0: learning_rate=0.01, momentum=0.9; 1200: learning_rate=0.012' -> [(0, {...}),
  (1200, {...})]: steps strictly increasing from 0, each field set at step 0 (a later step
  changes some of them). An empty text is no schedule: []."""
  where = 'config.search.schedule'
  segments = [_segment(item.strip(), where) for item in text.split(';') if item.strip()]
  for (before, _), (step, _) in zip(segments, segments[1:]):
    if step <= before:
      raise UserError(f'{where}: step {step} comes after step {before}; list the steps in '
                      f'increasing order, each once')
  if segments and segments[0][0] != 0:
    raise UserError(f'{where}: the first step is {segments[0][0]}; start at 0 (the values the '
                    f'run starts with)')
  for step, params in segments[1:]:
    late = [f for f in params if f not in segments[0][1]]
    if late:
      raise UserError(f'{where}: {late[0]} is first set at step {step}; set it at step 0 too '
                      f'(its value before {step})')
  return segments


def format_schedule(segments: list[tuple[int, dict]]) -> str:
  """The inverse of parse_schedule (floats by repr, so they read back exactly)."""
  return '; '.join(f'{int(step)}: ' + ', '.join(f'{k}={float(v)!r}' for k, v in params.items())
                   for step, params in segments)


def schedule_at(segments: list[tuple[int, dict]], step: int) -> dict:
  """The hyperparameters in force at `step`: every segment's values up to it, the later ones
  winning."""
  params = {}
  for start, values in segments:
    if start > step:
      break
    params.update(values)
  return params


# ---------------------------------------------------------------------------------------------
# Lineage: one JSON record per event, appended


def _cut_torn_tail(f) -> None:
  """Cuts a last line without its newline (a write cut short by a kill) off the file open in
  'a+b' mode, so that the next record does not join it."""
  size = f.seek(0, os.SEEK_END)
  if size == 0:
    return
  f.seek(0)
  raw = f.read()
  if not raw.endswith(b'\n'):
    f.truncate(raw.rfind(b'\n') + 1)
    f.seek(0, os.SEEK_END)


def append_lineage(path: str, records: list[dict]) -> None:
  """Appends `records` as JSON lines and syncs them to the disk (+inf as null)."""
  lines = ''.join(json.dumps(workdir_lib.as_json(r), allow_nan=False) + '\n' for r in records)
  with open(path, 'a+b') as f:
    _cut_torn_tail(f)
    f.write(lines.encode())
    f.flush()
    os.fsync(f.fileno())


def read_lineage(path: str) -> list[dict]:
  """The records of `path`; [] if there is none. A torn line (a kill mid-write) is dropped."""
  return workdir_lib.read_jsonl(path)


def truncate_lineage(path: str, after_step: int) -> None:
  """Keeps the records up to `after_step` (those of a resumed run's checkpoint), rewritten
  aside and renamed into place; a record without a step is kept."""
  if not os.path.exists(path):
    return
  kept = [r for r in read_lineage(path) if not _number(r.get('step')) or r['step'] <= after_step]
  with workdir_lib.written_aside(path) as tmp, open(tmp, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
    f.flush()
    os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# The study for optuna-dashboard


def _stored(optuna, trial: Trial, space, metric: str):
  """A finished Trial as the dashboard's study holds it: the metric's own value (accuracy
  un-negated), its step count in user_attrs."""
  sign = -1.0 if metric == 'val_accuracy' else 1.0
  attrs = {'trial': trial.number, 'slot': trial.slot, 'start_step': trial.start_step,
           'end_step': trial.end_step, 'parent': trial.parent}
  stored = dataclasses.replace(
      trial, intermediate={k: sign * v for k, v in trial.intermediate.items()})
  return _frozen(optuna, stored, space, sign * trial.value, attrs)


def write_study(path: str, name: str, space, trials: list[Trial], metric: str) -> None:
  """Writes the study a user opens with `optuna-dashboard sqlite:///PATH`: its finished trials
  (by number; running ones and those of another space left out), built from scratch beside
  `path` and renamed into place, so a kill never leaves half a study."""
  if metric not in METRICS:
    raise UserError(f"config.search.metric is {metric!r}, expected 'val_loss' or "
                    f"'val_accuracy'")
  direction = 'minimize' if metric == 'val_loss' else 'maximize'
  finished = sorted((t for t in trials if t.finished and _fits(t, space)),
                    key=lambda t: t.number)
  with workdir_lib.written_aside(path) as tmp:
    try:
      with _quiet_optuna() as optuna:
        storage = optuna.storages.RDBStorage(f'sqlite:///{tmp}')
        try:
          study = optuna.create_study(storage=storage, study_name=name, direction=direction)
          study.add_trials([_stored(optuna, t, space, metric) for t in finished])
        finally:
          storage.engine.dispose()
    finally:
      with contextlib.suppress(OSError):
        os.unlink(f'{tmp}-journal')
