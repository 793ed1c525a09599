"""A population that searches (config.search), end to end: pbt and halving runs killed -9 at
chosen moments and run again end bit for bit as the uninterrupted run; 'map' and 'vmap' decide
alike; the lineage, the study and each slot's schedule mean what they say; clones get fresh
keys; bad search configs are one line before any work; a schedule replays in a single run and
resumes bit-exactly; a workdir of another search is refused.

The yardsticks are uninterrupted runs trained in-process (module fixtures, shared); the kills
are launch.py subprocesses held by --debug_pause_at and SIGKILLed there. 800 synthetic training
examples (720 after the 10% holdout: 45 steps of 16 per epoch), 4 slots; pbt over 2 epochs with
a boundary every 15 steps (15, 30, 45: the first epoch's end, 60, 75), halving over 1 epoch with
a boundary every 10 steps (rungs at ages 10, 20 and 40).
"""
import functools
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import warnings

import numpy as np
import pytest

import digitjax
from conftest import ROOT, launch_args, wait_for, write_dataset
from digitjax import search
from digitjax.errors import UserError

SPACE = 'learning_rate=loguniform(0.003,0.3);momentum=uniform(0.5,0.95)'
BOUNDS = {'learning_rate': (0.003, 0.3), 'momentum': (0.5, 0.95)}
STEPS_PER_EPOCH = 45
LAST_STEP = 90
READY = 15
SIZE = 4
TIMEOUT = 300  # seconds for one launch.py run; generous, the CPU may be shared

# Every run's fields beyond the data's; chunk_steps=5 puts a chunk boundary (where step:N
# pauses) between the search's boundaries, checkpoint_keep=10 keeps every checkpoint.
BASE = {'batch_size': 16, 'eval_batch_size': 50, 'learning_rate': 0.02, 'num_epochs': 2.0,
        'plots': False, 'chunk_steps': 5, 'checkpoint_keep': 10}
PBT = {**BASE, 'search.kind': 'pbt', 'search.space': SPACE, 'search.size': SIZE,
       'search.ready_steps': READY}
HALVING_READY = 10
HALVING = {**PBT, 'search.kind': 'halving', 'search.eta': 2, 'num_epochs': 1.0,
           'search.ready_steps': HALVING_READY}


# ---------------------------------------------------------------------------------------------
# Configs, runs and their files


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Synthetic digits with 10% wrong labels (every step moves the parameters), and a tfds
  data_dir of this module's own."""
  root = tmp_path_factory.mktemp('search_data')
  return write_dataset(root / 'idx', n_train=800, n_test=200, label_noise=0.1), root / 'tfds'


def _data_fields(data) -> dict:
  idx, tfds = data
  return {'data.manual_dir': str(idx), 'data.data_dir': str(tfds),
          'data.verify_checksums': False}


def make_config(data, fields: dict):
  import default
  config = default.get_config()
  for key, value in {**_data_fields(data), **fields}.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def command(workdir, data, fields: dict, *extra) -> list[str]:
  """launch.py with the very config make_config(data, fields) builds."""
  flags = [f'--config.{k}={v}' for k, v in {**_data_fields(data), **fields}.items()]
  return launch_args('--config=configs/default.py', f'--workdir={workdir}', *flags, *extra)


def train(data, fields: dict, workdir) -> dict:
  return digitjax.train(make_config(data, fields), str(workdir))


def slot_dirs(workdir) -> list[pathlib.Path]:
  return sorted((pathlib.Path(workdir) / 'members').iterdir())


def read_json(path) -> dict:
  return json.loads(pathlib.Path(path).read_text())


def lineage(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / 'lineage.jsonl').read_text()
          .splitlines()]


def checkpoint_meta(run_dir, step: int) -> dict:
  return read_json(pathlib.Path(run_dir) / 'checkpoints' / str(step) / 'meta' / 'metadata')


@functools.lru_cache(maxsize=None)
def _restored(path: str) -> dict:
  import jax
  import orbax.checkpoint as ocp
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # the sharding is read from the file
    return jax.tree.map(np.asarray, ocp.PyTreeCheckpointer().restore(path))


def checkpoint_state(run_dir, step: int) -> dict:
  """A checkpoint's arrays as numpy (orbax, without a target)."""
  return _restored(str(pathlib.Path(run_dir) / 'checkpoints' / str(step) / 'state'))


def study_trials(workdir) -> list:
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.load_study(study_name='digitjax', storage=f'sqlite:///{workdir}/study.db')
  return study.trials


def study_record(workdir) -> list[tuple]:
  """What a study holds, comparable between runs."""
  return [(t.state.name, t.value, t.params, t.intermediate_values, t.user_attrs)
          for t in study_trials(workdir)]


def outcome(workdir) -> dict:
  """What an interrupted run must end with, exactly as the uninterrupted one: the lineage's
  bytes, each slot's test figures, search record and final arrays, the population's figures
  and the study."""
  population = read_json(pathlib.Path(workdir) / 'results.json')
  slots = {}
  for d in slot_dirs(workdir):
    r = read_json(d / 'results.json')
    slots[d.name] = {'test_loss': r['test_loss'], 'test_accuracy': r['test_accuracy'],
                     'search': r['search'], 'checkpoint_step': r['checkpoint_step'],
                     'arrays_sha256': checkpoint_meta(d, r['checkpoint_step'])['arrays_sha256']}
  return {'lineage': (pathlib.Path(workdir) / 'lineage.jsonl').read_bytes(), 'slots': slots,
          'population': {k: population[k] for k in ('test_loss', 'test_accuracy', 'selected')},
          'study': study_record(workdir)}


def compare_outcomes(got: dict, want: dict) -> None:
  if got['lineage'] != want['lineage']:
    got_lines, want_lines = got['lineage'].splitlines(), want['lineage'].splitlines()
    first = next((i for i, (a, b) in enumerate(zip(got_lines, want_lines)) if a != b),
                 min(len(got_lines), len(want_lines)))
    pytest.fail(f'lineage.jsonl differs from the uninterrupted run\'s at line {first + 1} '
                f'({len(got_lines)} lines, expected {len(want_lines)}):\n'
                f'got      {got_lines[first:first + 1]}\nexpected {want_lines[first:first + 1]}')
  same = lambda x: json.dumps(x, sort_keys=True, default=repr)  # NaN equals NaN here
  assert same(got['slots']) == same(want['slots']), (got['slots'], want['slots'])
  assert same(got['population']) == same(want['population'])
  assert same(got['study']) == same(want['study']), (got['study'], want['study'])


def cut_back_to(workdir, step: int) -> None:
  """The workdir as a kill right after the checkpoint at `step` leaves it: later checkpoints
  and every results file gone (the lineage's later records are the run's to cut back)."""
  workdir = pathlib.Path(workdir)
  for name in ('results.json', 'population.csv', 'found_config.py'):
    (workdir / name).unlink(missing_ok=True)
  for d in slot_dirs(workdir):
    (d / 'results.json').unlink(missing_ok=True)
    for ckpt in (d / 'checkpoints').iterdir():
      if ckpt.name.isdigit() and int(ckpt.name) > step:
        shutil.rmtree(ckpt)


def copy_workdir(src, dst) -> pathlib.Path:
  shutil.copytree(src, dst)
  (pathlib.Path(dst) / 'run.lock').unlink(missing_ok=True)
  return pathlib.Path(dst)


@pytest.fixture(scope='module')
def pbt_run(data, tmp_path_factory):
  """The uninterrupted pbt run ('map', CPU's default): its workdir and outcome."""
  workdir = tmp_path_factory.mktemp('pbt') / 'run'
  train(data, PBT, workdir)
  return workdir, outcome(workdir)


@pytest.fixture(scope='module')
def halving_run(data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('halving') / 'run'
  train(data, HALVING, workdir)
  return workdir, outcome(workdir)


class Killed:
  """A launch.py run held at `pause` (--debug_pause_at) and SIGKILLed there."""

  def __init__(self, processes, workdir, data, fields, pause: str, logs: pathlib.Path):
    out, err = self.files = logs.with_suffix('.stdout'), logs.with_suffix('.stderr')
    proc = processes.popen(command(workdir, data, fields, f'--debug_pause_at={pause}'),
                           cwd=ROOT, stdout=open(out, 'w'), stderr=open(err, 'w'))
    self.where = wait_for(proc, err.read_text, r'digitjax: paused at ([^(]+?)(?: \(step (\d+)\))?'
                          r' \(--debug_pause_at\)')
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, err.read_text()[-3000:]

  def output(self) -> str:
    return ''.join(f.read_text() for f in self.files)


def run_again(processes, workdir, data, fields) -> str:
  """The same command again, to the end: its output."""
  done = processes.run(command(workdir, data, fields), cwd=ROOT, timeout=TIMEOUT)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout + done.stderr


def resumed_from(output: str) -> int:
  found = re.search(r'Resuming (?:the group )?from checkpoint at step (\d+)', output)
  assert found, output[-3000:]
  return int(found.group(1))


# ---------------------------------------------------------------------------------------------
# 1, 2. Killed -9 and run again: the uninterrupted run's decisions and figures, bit for bit


@pytest.mark.slow
def test_pbt_killed_three_times_resumes_bit_exactly(pbt_run, data, processes, tmp_path):
  """One workdir killed -9 three times, each time run again with the same command:
  - at step 50, between boundaries (after the epoch's checkpoint and search step at 45);
  - inside the search's step at 60 (states and numbers changed, nothing recorded yet);
  - inside the checkpoint of the boundary at 75 (its lineage records appended, its save under
    way);
  then to the end: the uninterrupted run's lineage, figures, study and arrays. And the third
  kill as it is where orbax had not yet committed two slots' checkpoint 75: the group goes back
  to 60, and the lineage's records of 75 are cut and decided again."""
  _, want = pbt_run
  workdir = tmp_path / 'run'
  killed = Killed(processes, workdir, data, PBT, 'step:50', tmp_path / 'first')
  assert killed.where.group(1) == 'step 50'
  assert max(r['step'] for r in lineage(workdir)) == 45
  killed = Killed(processes, workdir, data, PBT, 'searching:60', tmp_path / 'second')
  assert killed.where.groups() == ('searching', '60')
  # (a checkpoint's save may not have been committed when a kill came: the one before it is)
  assert resumed_from(killed.output()) in (30, 45)
  assert max(r['step'] for r in lineage(workdir)) == 45
  killed = Killed(processes, workdir, data, PBT, 'saving:75', tmp_path / 'third')
  assert killed.where.groups() == ('saving', '75')
  assert resumed_from(killed.output()) in (30, 45)
  assert {r['step'] for r in lineage(workdir)} == {0, 15, 30, 45, 60, 75}  # before the save
  assert not (workdir / 'results.json').exists()
  uncommitted = copy_workdir(workdir, tmp_path / 'uncommitted')
  for d in slot_dirs(uncommitted)[2:]:
    shutil.rmtree(d / 'checkpoints' / '75', ignore_errors=True)

  assert resumed_from(run_again(processes, workdir, data, PBT)) in (60, 75)
  compare_outcomes(outcome(workdir), want)
  assert resumed_from(run_again(processes, uncommitted, data, PBT)) == 60
  compare_outcomes(outcome(uncommitted), want)


def test_halving_culls_and_refills(halving_run):
  events = [r['event'] for r in lineage(halving_run[0])]
  assert events.count('start') == SIZE
  assert events.count('cull') >= 2 and events.count('cull') == events.count('refill'), events


@pytest.mark.slow
def test_halving_killed_between_boundaries_resumes_bit_exactly(halving_run, data, processes,
                                                               tmp_path):
  """Killed -9 at step 25 (after the culls and refills of 10 and 20): the rungs' record, the
  pruned trials and the refilled slots' fresh states come back from the checkpoint at 20."""
  _, want = halving_run
  workdir = tmp_path / 'run'
  killed = Killed(processes, workdir, data, HALVING, 'step:25', tmp_path / 'killed')
  assert killed.where.group(1) == 'step 25'
  assert {'cull', 'refill'} <= {r['event'] for r in lineage(workdir)}
  assert max(r['step'] for r in lineage(workdir)) == 20
  assert resumed_from(run_again(processes, workdir, data, HALVING)) in (10, 20)
  compare_outcomes(outcome(workdir), want)


# ---------------------------------------------------------------------------------------------
# 3. 'map' and 'vmap' decide alike


def _decisions(records):
  return [(r['step'], r['event'], r['slot'], r.get('parent_slot'), r['trial'])
          for r in records]


@pytest.mark.slow
def test_map_and_vmap_make_the_same_decisions(pbt_run, data, tmp_path):
  """The first epoch under 'vmap' (boundaries 15 and 30) decides as 'map' did: the same
  exploits, donors, trials and explored numbers. The scores differ in float32's last digits
  (vmapped arithmetic rounds otherwise), a difference that training at high learning rates
  grows over the steps (1e-8 at 15, up to 1e-3 by 90 here): they are compared where it is
  still small."""
  workdir = tmp_path / 'vmap'
  train(data, {**PBT, 'sweep.execution': 'vmap', 'num_epochs': 1.0}, workdir)
  vmapped = lineage(workdir)
  mapped = [r for r in lineage(pbt_run[0]) if r['step'] <= 30]
  assert {r['step'] for r in vmapped} == {0, 15, 30}
  assert _decisions(vmapped) == _decisions(mapped)
  for a, b in zip(vmapped, mapped):
    assert a.get('new') == b.get('new') and a.get('old') == b.get('old'), (a, b)
    for key in ('score', 'parent_score'):
      if key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (key, a, b)


# ---------------------------------------------------------------------------------------------
# 4. What the lineage, the study and the schedules say


def _scores_by_step(trials) -> dict[int, dict[int, float]]:
  """step -> {slot: fitness there}, from the study's intermediate values."""
  scores = {}
  for t in trials:
    for step, value in t.intermediate_values.items():
      slot_scores = scores.setdefault(int(step), {})
      assert t.user_attrs['slot'] not in slot_scores, (step, t.user_attrs)
      slot_scores[t.user_attrs['slot']] = value
  return scores


def _all_trials(records) -> set[int]:
  return {r['trial'] for r in records if r['event'] in ('start', 'exploit', 'refill')}


def _check_study(workdir, records, kind: str):
  trials = study_trials(workdir)
  numbers = [t.user_attrs['trial'] for t in trials]
  assert sorted(numbers) == sorted(_all_trials(records)), 'one study trial per trial'
  for t in trials:
    assert set(t.params) == set(BOUNDS)
    for field, value in t.params.items():
      low, high = BOUNDS[field]
      assert low <= value <= high, (t.user_attrs, field, value)
    last = max(t.intermediate_values)
    assert t.value == t.intermediate_values[last] and t.user_attrs['end_step'] == last
    assert t.user_attrs['start_step'] < last
  culled = {r['trial'] for r in records if r['event'] == 'cull'}
  assert {t.user_attrs['trial'] for t in trials if t.state.name == 'PRUNED'} == culled
  return trials


def _check_schedules(workdir, records):
  """Each slot's schedule starts at 0 and ends with its final numbers, those of its last
  trial in the lineage."""
  for i, d in enumerate(slot_dirs(workdir)):
    found = read_json(d / 'results.json')['search']
    last = [r for r in records if r['slot'] == i and r['event'] in ('start', 'explore',
                                                                     'refill')][-1]
    assert found['trial'] == last['trial'] and found['params'] == last['new']
    segments = search.parse_schedule(found['schedule'])
    assert segments[0][0] == 0, found
    assert search.schedule_at(segments, 10 ** 9) == found['params'], found
    assert segments[-1][1] == found['params'], found


def test_pbt_lineage_study_and_schedules_mean_what_they_say(pbt_run):
  workdir, _ = pbt_run
  records = lineage(workdir)
  assert [r['event'] for r in records[:SIZE]] == ['start'] * SIZE
  trials = _check_study(workdir, records, 'pbt')
  scores = _scores_by_step(trials)
  k = max(1, math.floor(SIZE * 0.25))  # config.search.quantile
  seen = {r['trial'] for r in records[:SIZE]}
  exploits = [r for r in records if r['event'] == 'exploit']
  assert [r['step'] for r in exploits] == [15, 30, 45, 60, 75]  # k=1: one at each boundary
  for i, r in enumerate(records):
    if r['event'] != 'exploit':
      continue
    at = scores[r['step']]
    assert sorted(at) == list(range(SIZE)), 'every slot scored at every boundary'
    ranked = sorted(at, key=lambda s: (at[s], s))
    assert r['parent_slot'] in ranked[:k] and r['slot'] in ranked[-k:], (r, at)
    assert r['score'] == at[r['slot']] and r['parent_score'] == at[r['parent_slot']]
    assert r['trial'] not in seen and r['trial'] == max(seen) + 1, 'a clone is a new trial'
    seen.add(r['trial'])
    explore = records[i + 1]
    assert explore['event'] == 'explore' and explore['trial'] == r['trial']
    assert explore['slot'] == r['slot'] and explore['old'] == r['new']
    for field, value in explore['new'].items():
      assert BOUNDS[field][0] <= value <= BOUNDS[field][1]
  assert {t.state.name for t in trials} == {'COMPLETE'}
  _check_schedules(workdir, records)


def test_halving_lineage_study_and_schedules_mean_what_they_say(halving_run):
  """Every cull is ASHA's rule on the study's own figures: a trial that reached a rung (but
  the last) goes on only while in the best 1/eta of every trial that reached it so far."""
  workdir, _ = halving_run
  records = lineage(workdir)
  trials = {t.user_attrs['trial']: t for t in _check_study(workdir, records, 'halving')}
  rungs = search.rungs(HALVING_READY, 2, STEPS_PER_EPOCH)
  assert rungs == [10, 20, 40]
  culled = {(r['step'], r['trial']) for r in records if r['event'] == 'cull'}
  reached = {rung: [] for rung in rungs}  # each rung's fitness in arrival order
  for step in range(HALVING_READY, STEPS_PER_EPOCH, HALVING_READY):
    here = sorted((t for t in trials.values() if step in t.intermediate_values),
                  key=lambda t: t.user_attrs['slot'])
    assert len(here) == SIZE, step
    arriving = {}  # trial -> (its rung, its place in the rung's record)
    for t in here:  # all arrivals first, in slot order
      age = step - t.user_attrs['start_step']
      if age in reached:
        arriving[t.user_attrs['trial']] = (age, len(reached[age]))
        reached[age].append(t.intermediate_values[step])
    expected = set()
    for trial, (age, place) in arriving.items():
      entries = reached[age]
      rank = sum((v, j) < (entries[place], place) for j, v in enumerate(entries))
      if age != rungs[-1] and rank >= max(1, len(entries) // 2):
        expected.add((step, trial))
    assert {c for c in culled if c[0] == step} == expected, (step, reached)
  for r in records:
    if r['event'] == 'refill':
      t = trials[r['trial']]
      assert t.user_attrs['start_step'] == r['step'] and t.user_attrs['parent'] is None
  _check_schedules(workdir, records)


# ---------------------------------------------------------------------------------------------
# 5. A clone's random keys are its own


def test_a_clone_gets_its_donors_state_but_fresh_keys(pbt_run):
  """At each exploit's checkpoint (saved right after the search's step) the clone holds its
  donor's parameters and optimizer state exactly, and a random key no slot held before."""
  workdir, _ = pbt_run
  dirs = slot_dirs(workdir)
  exploits = [r for r in lineage(workdir) if r['event'] == 'exploit']
  assert exploits
  for r in exploits:
    step = r['step']
    now = [checkpoint_state(d, step) for d in dirs]
    before = [checkpoint_state(d, step - READY) for d in dirs] if step > READY else []
    clone, donor = now[r['slot']], now[r['parent_slot']]
    for part in ('params', 'opt_state'):
      same = [np.array_equal(a, b) for a, b in zip(
          _leaves(clone[part]), _leaves(donor[part]))]
      assert all(same), (r, part)
    earlier_keys = [s['rng'].tolist() for s in before]
    assert clone['rng'].tolist() not in earlier_keys, r
    assert clone['rng'].tolist() != donor['rng'].tolist(), r
    others = [s['rng'].tolist() for i, s in enumerate(now) if i != r['slot']]
    assert clone['rng'].tolist() not in others, r


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_a_refilled_slot_starts_from_fresh_parameters_and_keys(halving_run):
  workdir, _ = halving_run
  dirs = slot_dirs(workdir)
  refills = [r for r in lineage(workdir) if r['event'] == 'refill']
  for r in refills:
    step = r['step']
    mine = checkpoint_state(dirs[r['slot']], step)
    before = ([checkpoint_state(d, step - HALVING_READY) for d in dirs]
              if step > HALVING_READY else [])
    others = [checkpoint_state(d, step) for i, d in enumerate(dirs) if i != r['slot']]
    assert mine['rng'].tolist() not in [s['rng'].tolist() for s in before + others], r
    momentum = _leaves(mine['opt_state'])
    assert all(not np.any(m) for m in momentum), 'a refill starts with no momentum'
    if before:  # (a slot refilled at the boundary before started from another key)
      kernel = lambda state: state['params']['conv1']['kernel']
      assert not np.array_equal(kernel(mine), kernel(before[r['slot']])), r


# ---------------------------------------------------------------------------------------------
# 6. A bad search config is one line, before any work


NO_READY_STEPS = {k: v for k, v in PBT.items() if k != 'search.ready_steps'}
BAD = {  # name: (the run's fields, what its one line says)
    'unknown field': ({**PBT, 'search.space': 'lr=loguniform(1e-3,0.3)'},
                      "error: config.search.space: 'lr=loguniform(1e-3,0.3)': lr is not a "
                      "searchable field"),
    'log of 0': ({**PBT, 'search.space': 'learning_rate=loguniform(0,1)'},
                 'loguniform needs low > 0'),
    'no ready_steps': (NO_READY_STEPS, 'config.search.ready_steps is 0, expected a positive '
                       'number of steps'),
    'a sweep too': ({**PBT, 'sweep.grid': 'seed=0,1'},
                    'config.sweep.grid and config.sweep.members must be empty'),
}


@pytest.mark.slow
def test_a_bad_search_config_is_one_line_and_nothing_written(data, processes, tmp_path):
  """Each through launch.py (the four at once): exit 2, one line on stderr, no workdir."""
  procs = {name: processes.popen(command(tmp_path / name, data, fields), cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, (fields, _) in BAD.items()}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=TIMEOUT)
    lines = err.strip().splitlines()
    assert proc.returncode == 2, (name, err[-2000:])
    assert 'Traceback' not in err, (name, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith('error: '), (name, err[-2000:])
    assert BAD[name][1] in lines[0], (name, lines[0])
    assert not (tmp_path / name).exists(), (name, 'the workdir was made')


# ---------------------------------------------------------------------------------------------
# 7. A schedule replays in a single run


SCHEDULED = {**BASE, 'learning_rate': 0.01,
             'search.schedule': '0: learning_rate=0.01; 30: learning_rate=0.05'}


@pytest.fixture(scope='module')
def scheduled_run(data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('schedule') / 'run'
  results = train(data, SCHEDULED, workdir)
  return workdir, results


def test_a_schedule_is_the_constant_run_before_its_step_and_not_after(scheduled_run, data,
                                                                      tmp_path):
  """The constant run trained to step 30, then on to 45 (a run trained longer resumes)."""
  workdir, results = scheduled_run
  constant = tmp_path / 'constant'
  train(data, {**BASE, 'learning_rate': 0.01, 'num_epochs': 30 / STEPS_PER_EPOCH}, constant)
  train(data, {**BASE, 'learning_rate': 0.01, 'num_epochs': 1.0}, constant)
  sha = lambda run_dir, step: checkpoint_meta(run_dir, step)['arrays_sha256']
  assert sha(workdir, 30) == sha(constant, 30)
  assert sha(workdir, 45) != sha(constant, 45)


@pytest.mark.slow
def test_a_schedule_killed_after_its_step_resumes_bit_exactly(scheduled_run, data, processes,
                                                              tmp_path):
  workdir, results = scheduled_run
  again = tmp_path / 'run'
  killed = Killed(processes, again, data, SCHEDULED, 'saving:45', tmp_path / 'killed')
  assert killed.where.groups() == ('saving', '45')
  # (orbax waits for the save at 30 before it starts the one at 45: 30 is there)
  assert resumed_from(run_again(processes, again, data, SCHEDULED)) in (30, 45)
  got = read_json(again / 'results.json')
  assert (got['test_loss'], got['test_accuracy']) == (results['test_loss'],
                                                      results['test_accuracy'])
  assert (checkpoint_meta(again, LAST_STEP)['arrays_sha256']
          == checkpoint_meta(workdir, LAST_STEP)['arrays_sha256'])


# ---------------------------------------------------------------------------------------------
# 8. A workdir of another search


OTHER_SPACE = 'learning_rate=loguniform(0.001,0.1);momentum=uniform(0.5,0.95)'


@pytest.fixture
def stopped_pbt(pbt_run, tmp_path):
  """The pbt run as a kill after its checkpoint at 45 leaves it."""
  workdir = copy_workdir(pbt_run[0], tmp_path / 'stopped')
  cut_back_to(workdir, 45)
  return workdir


@pytest.mark.parametrize('change', [{'search.space': OTHER_SPACE}, {'search.kind': 'halving'},
                                    {'search.ready_steps': 10}],
                         ids=['space', 'kind', 'ready_steps'])
def test_another_search_in_a_stopped_workdir_is_one_clear_error(stopped_pbt, data, change):
  lineage_before = (stopped_pbt / 'lineage.jsonl').read_bytes()
  study_before = (stopped_pbt / 'study.db').read_bytes()
  changed = next(iter(change)).split('.')[-1]
  with pytest.raises(UserError, match=rf'another search \(config\.search\.{changed}='):
    train(data, {**PBT, **change}, stopped_pbt)
  assert (stopped_pbt / 'lineage.jsonl').read_bytes() == lineage_before
  assert (stopped_pbt / 'study.db').read_bytes() == study_before
  for d in slot_dirs(stopped_pbt):
    assert sorted(int(c.name) for c in (d / 'checkpoints').iterdir() if c.name.isdigit()) == [
        15, 30, 45]


def test_another_search_refused_leaves_the_workdirs_config_as_it_was(stopped_pbt, data):
  """The stored config (config.json: what `launch.py --workdir=W` resumes with, what
  found_config.py loads) is still the search the checkpoints were trained with."""
  files = [stopped_pbt / 'config.json'] + [d / 'config.json' for d in slot_dirs(stopped_pbt)]
  before = [f.read_bytes() for f in files]
  with pytest.raises(UserError, match='another search'):
    train(data, {**PBT, 'search.space': OTHER_SPACE}, stopped_pbt)
  from digitjax import stored_config
  assert stored_config.load(str(stopped_pbt)).search.space == SPACE
  assert [f.read_bytes() for f in files] == before


@pytest.mark.parametrize('change', [{'search.space': OTHER_SPACE}, {'search.kind': 'halving'}],
                         ids=['space', 'kind'])
def test_another_search_in_a_finished_workdir_is_one_clear_error(pbt_run, data, tmp_path,
                                                                 change):
  workdir = copy_workdir(pbt_run[0], tmp_path / 'finished')
  with pytest.raises(UserError, match='another search'):
    train(data, {**PBT, **change}, workdir)


# ---------------------------------------------------------------------------------------------
# A diverged trial


# Learning rates up to 30: the first proposals include 7.7 and 2.1, whose slots diverge (a
# non-finite validation loss) before the first boundary.
WILD = {**HALVING, 'search.ready_steps': 15,
        'search.space': 'learning_rate=loguniform(0.003,30);momentum=uniform(0.5,0.95)'}


@pytest.mark.slow
def test_a_diverged_trial_counts_the_same_after_a_resume(data, tmp_path):
  """A run resumed after a slot diverged ends as the uninterrupted run: its study (and the
  history optuna proposes from) holds the diverged trial in both, or in neither."""
  uninterrupted = tmp_path / 'uninterrupted'
  train(data, WILD, uninterrupted)
  diverged = [r for r in lineage(uninterrupted) if r['event'] == 'cull' and r['score'] is None]
  assert diverged and diverged[0]['step'] == 15, lineage(uninterrupted)
  resumed = copy_workdir(uninterrupted, tmp_path / 'resumed')
  cut_back_to(resumed, 30)  # as a kill after the checkpoint at 30 leaves it
  train(data, WILD, resumed)
  compare_outcomes(outcome(resumed), outcome(uninterrupted))


def test_tensorboard_hparams_hold_one_run_per_trial(pbt_run):
  """TensorBoard's HParams view of a search, read with TensorBoard's own loader: the
  experiment at tensorboard/search/, one run per trial (pbt: per segment) with its numbers and
  its fitness at each boundary and at its end (as study.db holds them), and no other folder."""
  pytest.importorskip('tensorboard', reason='tensorboard is not installed (pip install .[test])')
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import metadata
  workdir = pbt_run[0]
  root = workdir / 'tensorboard' / 'search'
  trials = {t.user_attrs['trial']: t for t in study_trials(workdir)}
  assert len(trials) > 4  # the 4 first trials and the clones' segments
  assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(
      f'trial{n}' for n in trials)
  for n, trial in trials.items():
    acc = event_accumulator.EventAccumulator(str(root / f'trial{n}'))
    acc.Reload()
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG])
    assert {k: v.number_value for k, v in start.hparams.items()} == pytest.approx(trial.params)
    want = sorted(trial.intermediate_values.items())
    got = [(e.step, e.value) for e in acc.Scalars('val_loss')]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # float32
