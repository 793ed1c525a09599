"""A population that searches: the search's steps over a group's loop (loop.Extension).

config.search.kind='pbt' or 'halving' trains `config.search.size` slots as one group (one
program under 'vmap', one per step under 'map'), their searched numbers (config.search.space)
passed to the step as arrays, so they change between compiled calls without recompiling.
Every `ready_steps` steps (a boundary), the slots are scored on validation (search.fitness),
and
- 'pbt': the bottom fraction copies parameters, optimizer state and hyperparameters from a
  slot drawn from the top fraction, then explores (search.pbt_step);
- 'halving': slots whose age reaches a rung (ready_steps x eta^r) go on if in the best 1/eta
  of all that reached it, else are culled and refilled with a new proposal (search.propose)
  that starts from fresh parameters (search.halving_step).
The copies are a gather and an update of the group's states between calls: no files between
trials. A copy or a refill gets fresh random keys (folded from the base seed and its new
trial's number), never its parent's. The search's whole state (each slot's numbers and trial,
every trial, the rungs' record) is saved in every member's checkpoint at each boundary, after
the step; lineage.jsonl is appended before that save and cut back to the restored step on
resume, so a run killed at any moment and run again makes the same decisions, bit for bit.

config.search.schedule replays a found schedule in a single run (`Schedule`): its numbers
change at the given steps, from scratch.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax

from digitjax import loop, search, signals, steps
from digitjax import workdir as workdir_lib
from digitjax.plan import SearchPlan

LINEAGE = 'lineage.jsonl'
STUDY = 'study.db'
FOUND_CONFIG = 'found_config.py'


def _score(value: float) -> float | None:
  """A fitness for JSON: None for a diverged member (+inf)."""
  return value if math.isfinite(value) else None


def _hyper(hp: steps.Hyper, params: dict) -> steps.Hyper:
  return hp._replace(**{steps.HYPER_OF_FIELD[f]: float(v) for f, v in params.items()})


def _fresh_key(seed: int, trial: int):
  return jax.random.fold_in(jax.random.key(seed), trial)


@dataclasses.dataclass
class State:
  """The search's state at a step: saved with every checkpoint, restored with it."""
  generation: int
  params: list[dict]          # each slot's numbers now
  current: list[int]          # each slot's trial
  trials: list[search.Trial]
  record: dict                # 'halving': rung (steps) -> every fitness that reached it

  def to_json(self) -> dict:
    return {'generation': self.generation, 'params': self.params, 'current': self.current,
            'trials': [t.to_json() for t in self.trials],
            'record': {str(k): workdir_lib.as_json(vs) for k, vs in self.record.items()}}

  @classmethod
  def from_json(cls, d: dict) -> 'State':
    unscore = lambda v: math.inf if v is None else v
    return cls(d['generation'], [dict(p) for p in d['params']], list(d['current']),
               [search.Trial.from_json(t) for t in d['trials']],
               {int(k): [unscore(v) for v in vs] for k, vs in d['record'].items()})


class Search(loop.Extension):
  """The search's steps for one group of `config.search.size` slots (`plan`: config.search)."""
  handles_divergence = True

  def __init__(self, plan: SearchPlan, workdir: str):
    self.plan, self.space, self.kind = plan, plan.space, plan.kind
    self.searched = tuple(steps.HYPER_OF_FIELD[d.field] for d in self.space)
    self.lineage = os.path.join(workdir, LINEAGE)
    self.study = os.path.join(workdir, STUDY)
    self.state: State | None = None

  # Resume

  def restored(self, run, metas) -> None:
    records = [m['search'] for m in (metas or []) if m and 'search' in m]
    if records:
      check_same_search(records[0].get('identity'), self.plan.identity,
                        f'the checkpoints in {run.members[0].files.dir} hold')
      self.state = State.from_json(records[0]['state'])
      if run.writes:
        search.truncate_lineage(self.lineage, run.step)
    else:
      self.state = self._start(run)
    for i, params in enumerate(self.state.params):
      run.group.hypers[i] = _hyper(run.group.hypers[i], params)

  def _start(self, run) -> State:
    params = [{d.field: float(getattr(hp, steps.HYPER_OF_FIELD[d.field])) for d in self.space}
              for hp in run.group.hypers]  # each slot's first numbers (plan._first_proposals)
    trials = [search.Trial(i, i, p, 0) for i, p in enumerate(params)]
    if run.writes:
      if os.path.exists(self.lineage):
        search.truncate_lineage(self.lineage, -1)
      search.append_lineage(self.lineage, [
          {'step': 0, 'generation': 0, 'event': 'start', 'slot': t.slot, 'trial': t.number,
           'new': t.params} for t in trials])
    return State(0, params, list(range(len(params))), trials, {})

  # The boundaries

  def next_boundary(self, run) -> int | None:
    ready = self.plan.ready_steps
    boundary = (run.step // ready + 1) * ready
    return boundary if boundary < run.last_step else None

  def at_boundary(self, run) -> None:
    scores = self._scores(run)
    state = self.state
    state.generation += 1
    for slot, trial in enumerate(state.current):
      state.trials[trial].intermediate[run.step] = scores[slot]
    events = (self._pbt(run, scores) if self.kind == 'pbt' else self._halving(run, scores))
    run.inputs = run.group.with_numbers([feed for feed, _ in run.inputs])
    signals.reached('searching', run.step)
    if run.writes:
      search.append_lineage(self.lineage, events)
      if run.step == run.epoch.last_step(run.spe):  # at epoch ends: a second per write
        self.write_study()
    moved = sorted({e['slot'] for e in events})
    if moved:
      loop.log(f'Search step {state.generation} at step {run.step}: '
               f'{len(moved)} slot(s) changed ({self.kind}); best fitness '
               f'{min(scores):.4f} ({self.plan.metric})')

  def _scores(self, run) -> list[float]:
    """Each slot's fitness at the run's step (lower better; +inf for a diverged one)."""
    return [search.fitness({} if v is None else {
        'val_loss': v['loss'], 'val_accuracy': v['accuracy']}, self.plan.metric)
            for v in loop.validation(run)]

  def _end_trial(self, slot: int, step: int, score: float, how: str = 'complete') -> None:
    trial = self.state.trials[self.state.current[slot]]
    trial.end_step, trial.value, trial.state = step, score, how

  def _begin_trial(self, slot: int, step: int, params: dict, parent: int | None) -> search.Trial:
    trial = search.Trial(len(self.state.trials), slot, params, step, parent=parent)
    self.state.trials.append(trial)
    self.state.current[slot] = trial.number
    self.state.params[slot] = params
    return trial

  def _pbt(self, run, scores: list[float]) -> list[dict]:
    state, group = self.state, run.group
    copies = search.pbt_step(scores, state.params, self.space, state.generation, self.plan.pbt)
    donors = {c.donor: group.member_state(run.carry, c.donor) for c in copies}
    events = []
    for c in copies:
      parent = state.current[c.donor]
      self._end_trial(c.slot, run.step, scores[c.slot])
      old_trial = state.current[c.slot]
      trial = self._begin_trial(c.slot, run.step, c.new, parent)
      key = jax.random.key_data(jax.random.fold_in(_fresh_key(self.plan.seed, trial.number),
                                                    0x5eed))
      run.carry = group.with_member_state(run.carry, c.slot, donors[c.donor].replace(rng=key))
      group.hypers[c.slot] = _hyper(group.hypers[c.slot], c.new)
      common = {'step': run.step, 'generation': state.generation, 'slot': c.slot,
                'trial': trial.number}
      events += [{**common, 'event': 'exploit', 'parent_slot': c.donor, 'parent_trial': parent,
                  'replaced_trial': old_trial, 'old': c.old,
                  'new': state.trials[parent].params, 'score': _score(scores[c.slot]),
                  'parent_score': _score(scores[c.donor])},
                 {**common, 'event': 'explore', 'old': state.trials[parent].params,
                  'new': c.new}]
    return events

  def _halving(self, run, scores: list[float]) -> list[dict]:
    s, state, group = self.plan, self.state, run.group
    ages = [run.step - state.trials[t].start_step for t in state.current]
    rungs = search.rungs(s.ready_steps, s.eta, run.last_step)
    culled = search.halving_step(ages, scores, state.record, s.eta, rungs)
    culled = sorted(set(culled) | {i for i, v in enumerate(scores) if not math.isfinite(v)})
    if not culled:
      return []
    proposals = search.propose(self.space, state.trials, len(culled), self.plan.seed,
                               state.generation, s.sampler)
    events = []
    for slot, params in zip(culled, proposals):
      old = state.current[slot]
      self._end_trial(slot, run.step, scores[slot], 'pruned')
      trial = self._begin_trial(slot, run.step, params, None)
      run.carry = group.with_member_state(
          run.carry, slot, group.fresh_state(_fresh_key(self.plan.seed, trial.number)))
      group.hypers[slot] = _hyper(group.hypers[slot], params)
      common = {'step': run.step, 'generation': state.generation, 'slot': slot}
      events += [{**common, 'event': 'cull', 'trial': old, 'age': ages[slot],
                  'score': _score(scores[slot]), 'old': state.trials[old].params},
                 {**common, 'event': 'refill', 'trial': trial.number, 'new': params}]
    return events

  # Records

  def meta(self, run) -> dict:
    return {'search': {'identity': self.plan.identity, 'state': self.state.to_json()}}

  def finish(self, run) -> None:
    """Each slot's trial ends with its last validation figures; the study is written."""
    scores = self._scores(run)
    for slot, trial in enumerate(self.state.current):
      t = self.state.trials[trial]
      if t.state == 'running':
        t.intermediate[run.step] = scores[slot]
        self._end_trial(slot, run.step, scores[slot])
    if run.writes:
      self.write_study()
      self.write_records(run)

  def write_records(self, run) -> None:
    """The search for people: plots/search.png (the lineage as a picture) and TensorBoard's
    HParams view (tensorboard/search/: one run per trial, its fitness over steps)."""
    from digitjax import metrics as metrics_lib
    files = workdir_lib.RunFiles.of(os.path.dirname(self.lineage))
    metric = self.plan.metric
    if self.plan.plots:
      from digitjax import report  # matplotlib is imported only when pictures are drawn
      os.makedirs(files.plots, exist_ok=True)
      report.draw_search(os.path.join(files.plots, 'search.png'),
                         search.read_lineage(self.lineage), metric)
    natural = (lambda v: v) if metric == 'val_loss' else (lambda v: -v)
    runs = [{'name': f'trial{t.number}', 'hparams': t.params,
             'metrics': {metric: [(step, natural(v)) for step, v in t.intermediate.items()
                                  if math.isfinite(v)]}} for t in self.state.trials]
    metrics_lib.write_hparams(os.path.join(files.tensorboard, 'search'),
                              [d.field for d in self.space], runs, [metric])

  def write_study(self) -> None:
    search.write_study(self.study, 'digitjax', self.space, self.state.trials,
                       self.plan.metric)

  def schedule(self, slot: int) -> list[tuple[int, dict]]:
    """The numbers slot's model was trained with, step by step: its trial and its parents'."""
    chain, trial = [], self.state.trials[self.state.current[slot]]
    while trial is not None:
      chain.append(trial)
      trial = None if trial.parent is None else self.state.trials[trial.parent]
    # A halving refill starts from fresh parameters at its own start: its steps count from it.
    start = chain[-1].start_step
    return [(t.start_step - start, t.params) for t in reversed(chain)]

  def results(self, run, i: int) -> dict:
    return {'search': {'kind': self.kind, 'trial': self.state.current[i],
                       'params': self.state.params[i],
                       'schedule': search.format_schedule(self.schedule(i))}}


def check_same_search(saved: dict | None, current: dict, where: str) -> None:
  """A UserError if `saved` (a stored config's search section) is another search than
  `current` (SearchPlan.identity), naming the first differing field in the config's order (kind
  first); `where` says whose, with its verb ('--workdir=W holds')."""
  if not isinstance(saved, dict):
    return  # an old workdir's config, before config.search: a grid
  saved = workdir_lib.as_json({k: v for k, v in saved.items() if k != 'schedule'})
  if saved.get('kind', 'grid') == current['kind'] == 'grid':
    return
  differ = [k for k in current if saved.get(k) != current[k]]
  if differ:
    from digitjax.errors import UserError
    raise UserError(f'{where} another search (config.search.{differ[0]}='
                    f'{saved.get(differ[0])!r} then, {current[differ[0]]!r} now); use the '
                    f'config it was trained with, or a new --workdir')


class Schedule(loop.Extension):
  """config.search.schedule in a single run: the numbers change at the schedule's steps."""

  def __init__(self, segments: list[tuple[int, dict]]):
    self.segments = segments
    self.searched = tuple(sorted({steps.HYPER_OF_FIELD[f] for _, p in segments for f in p}))

  def restored(self, run, metas) -> None:
    self._apply(run)

  def _apply(self, run) -> None:
    for i in range(len(run.members)):
      run.group.hypers[i] = _hyper(run.group.hypers[i],
                                   search.schedule_at(self.segments, run.step))

  def next_boundary(self, run) -> int | None:
    later = [s for s, _ in self.segments if run.step < s < run.last_step]
    return later[0] if later else None

  def at_boundary(self, run) -> None:
    self._apply(run)
    run.inputs = run.group.with_numbers([feed for feed, _ in run.inputs])


# ---------------------------------------------------------------------------------------------
# The extension of a config


def extension(plan: SearchPlan, workdir: str) -> loop.Extension:
  """The loop's extension for config.search (`plan`): its search, the schedule a single run
  replays, or none."""
  if plan.kind in ('pbt', 'halving'):
    return Search(plan, workdir)
  if plan.schedule is not None:
    return Schedule(plan.schedule)
  return loop.Extension()


# ---------------------------------------------------------------------------------------------
# What a search delivers, as a run of its own

_FOUND = '''"""The numbers the {kind} search in this folder delivered ({name}, trial {trial}), as one model
trained from scratch as a single run, to reuse and check the schedule it found:
  python launch.py --config={path} --workdir=NEW_WORKDIR
This folder's config (config.json), with the search replaced by the schedule (the PBT member's
weights were copied between slots on the way: a run from scratch follows its numbers, not its
weights)."""
import os

from digitjax import stored_config

SCHEDULE = {schedule!r}
SEED = {seed!r}
SPLIT_SEED = {split_seed!r}  # the search's validation holdout


def get_config():
  config = stored_config.load(os.path.dirname(os.path.abspath(__file__)))
  config.search.kind, config.search.space, config.search.schedule = 'grid', '', SCHEDULE
  config.seed, config.data.split_seed = SEED, SPLIT_SEED
  return config
'''


def write_found_config(workdir: str, member: dict, results: dict, kind: str) -> str:
  """found_config.py: the delivered member's (`member`: its population record, `results`: its
  results.json) schedule as a config file; returns its path."""
  path = os.path.join(workdir, FOUND_CONFIG)
  found = results['search']
  text = _FOUND.format(kind=kind, name=member['name'], trial=found['trial'], path=path,
                       schedule=found['schedule'], seed=results['config']['seed'],
                       split_seed=results['config']['data']['split_seed'])
  with workdir_lib.written_aside(path) as tmp, open(tmp, 'w') as f:
    f.write(text)
  return path
