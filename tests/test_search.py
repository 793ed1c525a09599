"""Search inside a population (digitjax/search.py): the space and config checks, proposals,
PBT's exploit and explore, successive halving's rule, schedules, the lineage file and the
optuna study. No training: each test runs in well under a second or two."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_collections
import numpy as np
import pytest

from digitjax import search
from digitjax.errors import UserError

SPACE_TEXT = 'learning_rate=loguniform(1e-3,0.3); momentum=uniform(0.8,0.99)'


def space():
  return search.parse_space(SPACE_TEXT)


def make_config(**fields) -> ml_collections.ConfigDict:
  """The fields check_config reads: config.search as configs/default.py has it, a seed and
  config.augment.enabled; `fields` overrides config.search's ('augment' sets augment.enabled)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.augment = ml_collections.ConfigDict({'enabled': fields.pop('augment', False)})
  config.search = ml_collections.ConfigDict({
      'kind': 'grid', 'space': '', 'sampler': 'tpe', 'metric': 'val_loss', 'ready_steps': 0,
      'quantile': 0.25, 'resample_probability': 0.25, 'perturb': (0.8, 1.2), 'eta': 3,
      'size': 8, 'schedule': ''})
  for key, value in fields.items():
    config.search[key] = value
  return config


def finished_trials(params: list[dict], scores) -> list[search.Trial]:
  return [search.Trial(number=i, slot=i, params=p, start_step=0, end_step=100, value=s,
                       intermediate={50: s + 1.0, 100: s}, state='complete')
          for i, (p, s) in enumerate(zip(params, scores))]


# ---------------------------------------------------------------------------------------------
# The space and the config


def test_parse_space_reads_the_example_whitespace_and_all():
  expected = (search.Dimension('learning_rate', 'loguniform', 1e-3, 0.3),
              search.Dimension('momentum', 'uniform', 0.8, 0.99))
  assert space() == expected
  assert search.parse_space(' learning_rate = loguniform( 1e-3 , 0.3 ) ;\n momentum=uniform(0.8,'
                            '0.99);  ') == expected
  assert search.parse_space('') == ()


@pytest.mark.parametrize('text, message', [
    ('learning_rate loguniform(1e-3,0.3)', r"is not field=distribution\(low,high\)"),
    ('learning_rate=loguniform(1e-3)', r"is not field=distribution\(low,high\)"),
    ('lr=loguniform(1e-3,0.3)', r"lr is not a searchable field; search one of learning_rate, "
                                r"momentum, weight_decay, .*model\.dropout_rate$"),
    ('seed=uniform(0,3)', 'seed is not a searchable field'),
    ('momentum=normal(0.8,0.9)', 'normal is not a distribution; use uniform or loguniform'),
    ('momentum=uniform(a,0.9)', 'the bounds must be numbers'),
    ('momentum=uniform(0.9,0.8)', 'low < high'),
    ('momentum=uniform(0.9,0.9)', 'low < high'),
    ('momentum=uniform(0.5,inf)', 'finite'),
    ('weight_decay=loguniform(0,0.1)', 'loguniform needs low > 0'),
    ('momentum=uniform(0.8,0.9); momentum=uniform(0.5,0.6)', 'momentum is searched twice'),
    ('momentum=uniform(0.8,1.0)', r'momentum must be in \[0, 1\); 1.0 is not'),
    ('learning_rate=uniform(0,0.1)', 'learning_rate must be positive'),
    ('onecycle_pct_start=uniform(0.1,1)', r'onecycle_pct_start must be in \(0, 1\)'),
    ('augment.rotation=uniform(0,200)', r'augment.rotation must be in \[0, 180\]'),
    ('weight_decay=uniform(-1,0.1)', 'weight_decay must be 0 or positive'),
])
def test_parse_space_refuses_each_bad_form_in_one_line(text, message):
  with pytest.raises(UserError, match=message) as info:
    search.parse_space(text)
  assert '\n' not in str(info.value) and str(info.value).startswith('config.search.space: ')


def test_check_config_returns_the_space_of_a_search():
  config = make_config(kind='pbt', space=SPACE_TEXT, ready_steps=100)
  assert search.check_config(config) == space()
  assert search.check_config(make_config()) == ()  # the default: a grid
  assert search.check_config(make_config(kind='halving', space=SPACE_TEXT, ready_steps=50,
                                         quantile=7.0)) == space()  # pbt's fields not read
  config = make_config(kind='halving', space='augment.zoom=uniform(0,0.2)', ready_steps=5,
                       augment=True)
  assert search.check_config(config)[0].field == 'augment.zoom'
  schedule = '0: learning_rate=0.01, momentum=0.9; 1200: learning_rate=0.012'
  assert search.check_config(make_config(schedule=schedule)) == ()


@pytest.mark.parametrize('fields, message', [
    (dict(kind='bayes'), r"config.search.kind is 'bayes', expected 'grid', 'halving' or 'pbt'"),
    (dict(sampler='cmaes'), "config.search.sampler is 'cmaes'"),
    (dict(metric='accuracy'), "config.search.metric is 'accuracy'"),
    (dict(space=SPACE_TEXT), r"config.search.space is set but config.search.kind='grid'; set "
                             r"kind='pbt' or 'halving'"),
    (dict(kind='pbt', ready_steps=10), r"kind='pbt' needs config.search.space"),
    (dict(kind='halving', space=SPACE_TEXT), 'config.search.ready_steps is 0'),
    (dict(kind='pbt', space=SPACE_TEXT, ready_steps=10, size=1), 'config.search.size is 1'),
    (dict(kind='pbt', space=SPACE_TEXT, ready_steps=10, quantile=0.6),
     r'config.search.quantile is 0.6, expected in \(0, 0.5\]'),
    (dict(kind='pbt', space=SPACE_TEXT, ready_steps=10, quantile=0.0), 'quantile is 0.0'),
    (dict(kind='pbt', space=SPACE_TEXT, ready_steps=10, resample_probability=1.5),
     'resample_probability is 1.5'),
    (dict(kind='pbt', space=SPACE_TEXT, ready_steps=10, perturb=(0.8, -1.0)),
     'perturb is .*a pair of positive factors'),
    (dict(kind='pbt', space=SPACE_TEXT, ready_steps=10, perturb=(0.8, 1.2, 1.3)), 'perturb is'),
    (dict(kind='halving', space=SPACE_TEXT, ready_steps=10, eta=1),
     'config.search.eta is 1, expected an integer >= 2'),
    (dict(kind='pbt', space='augment.rotation=uniform(0,20)', ready_steps=10),
     r'augment.enabled=False; set config.augment.enabled=True to search augment.rotation'),
    (dict(kind='pbt', space=SPACE_TEXT, ready_steps=10, schedule='0: momentum=0.9'),
     r"config.search.schedule replays a single run.*set schedule='' or kind='grid'"),
    (dict(schedule='0: augment.shift=0.1'), r'set config.augment.enabled=True to search '
                                            r'augment.shift'),
    (dict(schedule='5: momentum=0.9'), 'the first step is 5; start at 0'),
])
def test_check_config_refuses_each_bad_field_in_one_line(fields, message):
  with pytest.raises(UserError, match=message) as info:
    search.check_config(make_config(**fields))
  assert '\n' not in str(info.value)


def test_check_config_names_a_missing_field():
  config = make_config()
  del config.search['eta']
  with pytest.raises(UserError, match='config.search.eta is missing'):
    search.check_config(config)


def test_fitness_is_lower_better_and_a_diverged_member_is_worst():
  assert search.fitness({'val_loss': 0.25}, 'val_loss') == 0.25
  assert search.fitness({'val_accuracy': 0.75}, 'val_accuracy') == -0.75
  for bad in (None, math.nan, math.inf, -math.inf):
    assert search.fitness({'val_loss': bad, 'val_accuracy': bad}, 'val_loss') == math.inf
    assert search.fitness({'val_loss': bad, 'val_accuracy': bad}, 'val_accuracy') == math.inf
  assert search.fitness({}, 'val_loss') == math.inf


def test_dimension_samples_and_clips_within_bounds():
  rng = np.random.default_rng(0)
  log_dim, dim = space()
  draws = [log_dim.sample(rng) for _ in range(2000)]
  assert all(1e-3 <= d <= 0.3 and type(d) is float for d in draws)
  # Log-uniform: about half the draws below the geometric mean.
  assert 0.45 < np.mean(np.array(draws) < math.sqrt(1e-3 * 0.3)) < 0.55
  assert all(0.8 <= dim.sample(rng) <= 0.99 for _ in range(200))
  assert (dim.clip(2.0), dim.clip(0.1), dim.clip(0.9)) == (0.99, 0.8, 0.9)


# ---------------------------------------------------------------------------------------------
# Trials and proposals


def test_a_trial_reads_back_from_json_exactly():
  trial = search.Trial(number=3, slot=1, params={'learning_rate': 0.1 + 0.2}, start_step=100,
                       end_step=200, value=math.inf, parent=0,
                       intermediate={150: 0.5, 200: math.inf}, state='pruned')
  record = json.loads(json.dumps(trial.to_json(), allow_nan=False))
  assert search.Trial.from_json(record) == trial
  running = search.Trial(number=4, slot=2, params={'momentum': 0.9}, start_step=0)
  assert search.Trial.from_json(json.loads(json.dumps(running.to_json()))) == running


def test_proposals_are_deterministic_within_bounds_and_differ_by_generation():
  dims = space()
  first = search.propose(dims, [], 6, 7, 1, 'tpe')
  assert first == search.propose(dims, [], 6, 7, 1, 'tpe')
  assert first != search.propose(dims, [], 6, 7, 2, 'tpe')
  assert first != search.propose(dims, [], 6, 8, 1, 'tpe')
  assert len(first) == 6 and len({p['learning_rate'] for p in first}) == 6
  for params in first:
    assert set(params) == {'learning_rate', 'momentum'}
    assert all(type(v) is float and d.low <= v <= d.high for d, v in zip(dims, params.values()))
  assert search.initial_params(dims, 6, 7, 'random') == search.propose(dims, [], 6, 7, 0,
                                                                       'random')
  assert search.propose(dims, [], 0, 7, 1, 'tpe') == []


def test_tpe_learns_from_the_history_and_random_does_not():
  dims = space()
  params = search.initial_params(dims, 30, 0, 'random')
  # Fitness best near learning_rate=0.01: TPE's proposals gather there, random's do not.
  scores = [abs(math.log(p['learning_rate'] / 0.01)) for p in params]
  history = finished_trials(params, scores)
  history[0].value, history[0].intermediate = math.inf, {100: math.inf}  # a diverged one
  history.append(search.Trial(30, 0, {'learning_rate': 0.2, 'momentum': 0.9}, 100))  # running
  tpe = search.propose(dims, history, 20, 0, 5, 'tpe')
  random = search.propose(dims, history, 20, 0, 5, 'random')
  assert tpe == search.propose(dims, history, 20, 0, 5, 'tpe')
  assert tpe != random
  distance = lambda ps: np.median([abs(math.log(p['learning_rate'] / 0.01)) for p in ps])
  assert distance(tpe) < distance(random)
  for params in tpe:
    assert all(d.low <= params[d.field] <= d.high for d in dims)


def test_a_trial_of_another_space_is_left_out_of_the_study():
  dims = space()
  params = search.initial_params(dims, 12, 0, 'random')
  history = finished_trials(params, range(12))
  stray = finished_trials([{'learning_rate': 5.0, 'momentum': 0.9}], [0.0])[0]
  assert search.propose(dims, history + [stray], 3, 0, 1, 'tpe') == search.propose(
      dims, history, 3, 0, 1, 'tpe')


# ---------------------------------------------------------------------------------------------
# Population-based training

SETTINGS = search.PbtSettings(quantile=0.25, resample_probability=0.25, perturb=(0.8, 1.2),
                              seed=3)


def population(size=8):
  return search.initial_params(space(), size, 0, 'random')


def perturbed(donor: dict) -> list[set]:
  """Each field's two values when perturbed: the donor's times 0.8 or 1.2, clipped."""
  return [{dim.clip(donor[dim.field] * f) for f in (0.8, 1.2)} for dim in space()]


def test_pbt_bottom_copies_from_top_and_explores():
  params = population()
  scores = [0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.4, 0.7]  # top: 1, 4; bottom: 2, 5
  for settings in (SETTINGS, dataclasses.replace(SETTINGS, resample_probability=0.0)):
    copies = search.pbt_step(scores, params, space(), 1, settings)
    assert [c.slot for c in copies] == [2, 5]
    for copy in copies:
      assert copy.donor in (1, 4) and copy.donor != copy.slot
      assert copy.old == params[copy.slot]
      assert all(d.low <= copy.new[d.field] <= d.high for d in space())
      if settings.resample_probability == 0:
        assert all(copy.new[d.field] in values
                   for d, values in zip(space(), perturbed(params[copy.donor])))
    assert copies == search.pbt_step(scores, params, space(), 1, settings)


def test_pbt_explore_perturbs_by_the_factors_or_resamples():
  params = population()
  dims = space()
  never = dataclasses.replace(SETTINGS, resample_probability=0.0)
  always = dataclasses.replace(SETTINGS, resample_probability=1.0)
  rng = np.random.default_rng(0)
  news = [search.explore(params[0], dims, rng, never) for _ in range(50)]
  for new in news:
    assert all(new[d.field] in values for d, values in zip(dims, perturbed(params[0])))
  assert {n['momentum'] for n in news} == perturbed(params[0])[1]  # both factors drawn
  resampled = [search.explore(params[0], dims, rng, always) for _ in range(50)]
  assert len({p['momentum'] for p in resampled}) == 50
  assert all(0.8 <= p['momentum'] <= 0.99 for p in resampled)
  # Half and half: some fields perturbed, some drawn anew.
  half = [search.explore(params[0], dims, rng, dataclasses.replace(SETTINGS,
                                                                  resample_probability=0.5))
          for _ in range(100)]
  kept = np.mean([p['momentum'] in perturbed(params[0])[1] for p in half])
  assert 0.3 < kept < 0.7
  # Clipped to the bounds: a donor at the top bound stays there when multiplied by 1.2.
  top = search.explore({'learning_rate': 0.3, 'momentum': 0.99, 'weight_decay': 0.5}, dims,
                       np.random.default_rng(1), never)
  assert top['learning_rate'] in (0.3, 0.3 * 0.8) and top['momentum'] in (0.99, 0.99 * 0.8)
  assert top['weight_decay'] == 0.5  # outside the space: kept


def test_pbt_a_diverged_member_is_always_copied_over():
  params = population()
  for generation in range(10):
    scores = [0.1 * i for i in range(8)]
    scores[generation % 8] = math.inf
    copies = search.pbt_step(scores, params, space(), generation, SETTINGS)
    assert generation % 8 in [c.slot for c in copies]
    assert all(math.isfinite(scores[c.donor]) for c in copies)
  # Only diverged members: nobody is worth copying.
  assert search.pbt_step([math.inf] * 8, params, space(), 1, SETTINGS) == []
  # More diverged than the bottom holds: all of them copy, from the finite ones of the top k.
  scores = [0.1, math.nan, math.inf, math.inf, math.inf, math.inf, 0.7, 0.8]
  copies = search.pbt_step(scores, params, space(), 1, dataclasses.replace(SETTINGS,
                                                                           quantile=0.5))
  assert [c.slot for c in copies] == [1, 2, 3, 4, 5]
  assert {c.donor for c in copies} <= {0, 6, 7} and len({c.donor for c in copies}) > 1


def test_pbt_draws_differ_by_generation_and_seed():
  params = population(16)
  scores = list(np.linspace(0.1, 1.6, 16))
  runs = [search.pbt_step(scores, params, space(), g, SETTINGS) for g in range(4)]
  assert all(len(r) == 4 and [c.slot for c in r] == [12, 13, 14, 15] for r in runs)
  assert len({json.dumps([(c.donor, c.new) for c in r]) for r in runs}) == 4
  other_seed = search.pbt_step(scores, params, space(), 0, dataclasses.replace(SETTINGS,
                                                                               seed=4))
  assert [(c.donor, c.new) for c in other_seed] != [(c.donor, c.new) for c in runs[0]]
  # Ties ranked by slot: the earlier slot is the better.
  copies = search.pbt_step([0.5] * 8, params[:8], space(), 0, SETTINGS)
  assert [c.slot for c in copies] == [6, 7] and {c.donor for c in copies} <= {0, 1}


def test_pbt_settings_from_the_config():
  config = make_config(kind='pbt', space=SPACE_TEXT, ready_steps=10, perturb=(1, 2))
  assert search.PbtSettings.of(config) == search.PbtSettings(0.25, 0.25, (1.0, 2.0), 0)


# ---------------------------------------------------------------------------------------------
# Successive halving


def test_rungs():
  assert search.rungs(100, 3, 1000) == [100, 300, 900]
  assert search.rungs(100, 2, 800) == [100, 200, 400, 800]
  assert search.rungs(100, 3, 99) == []
  with pytest.raises(ValueError):
    search.rungs(0, 3, 100)


def test_halving_keeps_the_best_third_of_the_first_rung():
  rung_ages = search.rungs(10, 3, 90)
  scores = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6, 0.4]
  record = {}
  cull = search.halving_step([10] * 9, scores, record, 3, rung_ages)
  kept = sorted(set(range(9)) - set(cull))
  assert kept == [1, 3, 5] and cull == [0, 2, 4, 6, 7, 8]
  assert record == {10: scores}


def test_halving_judges_a_later_arrival_against_the_whole_record():
  rung_ages = [10, 30, 90]
  record = {10: [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6, 0.4]}
  # Slot 0 reaches rung 10 (a refill); slot 1 reaches rung 30; others are between rungs.
  cull = search.halving_step([10, 30, 25, 5], [0.25, 0.4, 0.0, 0.0], record, 3, rung_ages)
  # Rung 10 holds 10 scores, keeps 3: 0.25 ranks third (after 0.1 and 0.2). Rung 30 holds one
  # score: max(1, 1 // 3) = 1 goes on.
  assert cull == []
  assert record == {10: [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6, 0.4, 0.25], 30: [0.4]}
  cull = search.halving_step([10, 30, 30, 5], [0.35, 0.5, 0.3, 0.0], record, 3, rung_ages)
  # Rung 10: 11 scores, keep 3; 0.35 ranks fifth. Rung 30: [0.4, 0.5, 0.3], keep 1: slot 2.
  assert cull == [0, 1]


def test_halving_ties_go_to_the_earlier_arrival_and_diverged_never_goes_on():
  record = {10: [0.5, 0.5]}
  assert search.halving_step([10], [0.5], record, 3, [10, 30]) == [0]  # 3 entries keep 1
  record = {}
  assert search.halving_step([10, 10, 10], [0.5, 0.5, 0.5], record, 3, [10, 30]) == [1, 2]
  # Alone at a rung it would go on, but a diverged member never does.
  assert search.halving_step([10], [math.nan], {}, 3, [10, 30]) == [0]


def test_halving_top_rung_culls_nobody():
  rung_ages = [10, 30, 90]
  record = {90: [0.1, 0.2]}
  assert search.halving_step([90, 90, 90], [0.9, 0.8, math.inf], record, 3, rung_ages) == []
  assert record[90] == [0.1, 0.2, 0.9, 0.8, math.inf]


# ---------------------------------------------------------------------------------------------
# Schedules


def test_schedule_round_trips_exactly():
  segments = [(0, {'learning_rate': 0.1 + 0.2, 'momentum': 0.9}),
              (1200, {'learning_rate': 1 / 3}), (2400, {'momentum': 1e-7})]
  text = search.format_schedule(segments)
  assert search.parse_schedule(text) == segments
  example = '0: learning_rate=0.01, momentum=0.9; 1200: learning_rate=0.012'
  assert search.format_schedule(search.parse_schedule(example)) == example
  assert search.parse_schedule(' 0 :learning_rate = 0.01 ;') == [(0, {'learning_rate': 0.01})]
  assert search.parse_schedule('') == []


def test_schedule_at_applies_the_segments_up_to_the_step():
  segments = search.parse_schedule('0: learning_rate=0.01, momentum=0.9; 1200: '
                                   'learning_rate=0.012; 2400: momentum=0.95')
  assert search.schedule_at(segments, 0) == {'learning_rate': 0.01, 'momentum': 0.9}
  assert search.schedule_at(segments, 1199) == {'learning_rate': 0.01, 'momentum': 0.9}
  assert search.schedule_at(segments, 1200) == {'learning_rate': 0.012, 'momentum': 0.9}
  assert search.schedule_at(segments, 10**6) == {'learning_rate': 0.012, 'momentum': 0.95}


@pytest.mark.parametrize('text, message', [
    ('learning_rate=0.01', r"is not 'step: field=value, \.\.\.'"),
    ('-5: learning_rate=0.01', r"is not 'step: field=value"),
    ('1.5: learning_rate=0.01', r"is not 'step: field=value"),
    ('0:', r"is not 'step: field=value"),
    ('0: learning_rate', r"'learning_rate' is not field=value"),
    ('0: lr=0.01', 'lr is not a searchable field; search one of learning_rate'),
    ('0: learning_rate=fast', 'learning_rate=fast is not a finite number'),
    ('0: learning_rate=nan', 'learning_rate=nan is not a finite number'),
    ('0: learning_rate=0.1, learning_rate=0.2', 'learning_rate is set twice'),
    ('0: momentum=1.5', r'momentum must be in \[0, 1\)'),
    ('0: learning_rate=0.1; 100: learning_rate=0.2; 100: learning_rate=0.3',
     'step 100 comes after step 100'),
    ('0: learning_rate=0.1; 200: learning_rate=0.2; 100: learning_rate=0.3',
     'step 100 comes after step 200'),
    ('100: learning_rate=0.1', 'the first step is 100; start at 0'),
    ('0: learning_rate=0.1; 100: momentum=0.8', 'momentum is first set at step 100; set it at '
                                                'step 0 too'),
])
def test_parse_schedule_refuses_each_bad_form_in_one_line(text, message):
  with pytest.raises(UserError, match=message) as info:
    search.parse_schedule(text)
  assert '\n' not in str(info.value) and str(info.value).startswith('config.search.schedule: ')


# ---------------------------------------------------------------------------------------------
# Lineage


def test_lineage_appends_reads_and_truncates(tmp_path):
  path = str(tmp_path / 'lineage.jsonl')
  assert search.read_lineage(path) == []
  search.truncate_lineage(path, 10)  # nothing there: nothing made
  assert not os.path.exists(path)
  events = [{'step': s, 'event': 'copy', 'slot': s % 3, 'value': 0.5} for s in (0, 10, 20)]
  search.append_lineage(path, events[:2])
  search.append_lineage(path, events[2:] + [{'step': 30, 'value': math.inf}])
  assert search.read_lineage(path) == events + [{'step': 30, 'value': None}]
  search.truncate_lineage(path, 10)
  assert search.read_lineage(path) == events[:2]
  assert os.listdir(tmp_path) == ['lineage.jsonl']


def test_lineage_drops_a_torn_last_line_and_appends_after_it(tmp_path):
  path = str(tmp_path / 'lineage.jsonl')
  search.append_lineage(path, [{'step': 0}, {'step': 5}])
  with open(path, 'ab') as f:
    f.write(b'{"step": 10, "ev')  # a kill mid-write
  assert search.read_lineage(path) == [{'step': 0}, {'step': 5}]
  search.append_lineage(path, [{'step': 10}])
  assert search.read_lineage(path) == [{'step': 0}, {'step': 5}, {'step': 10}]
  with open(path, 'ab') as f:
    f.write(b'{"step": 15')
  search.truncate_lineage(path, 100)
  with open(path, 'rb') as f:
    assert f.read() == b'{"step": 0}\n{"step": 5}\n{"step": 10}\n'


# ---------------------------------------------------------------------------------------------
# The study


def study_trials():
  params = search.initial_params(space(), 4, 0, 'random')
  trials = finished_trials(params, [-0.9, -0.95, -0.5, math.inf])
  trials[1].parent, trials[1].start_step = 0, 100
  trials[2].state = 'pruned'
  trials.append(search.Trial(4, 0, params[0], 100))  # running: not in the study
  return trials


@pytest.mark.parametrize('metric, direction, sign', [('val_accuracy', 'MAXIMIZE', -1.0),
                                                     ('val_loss', 'MINIMIZE', 1.0)])
def test_write_study_reads_back_in_optuna(tmp_path, metric, direction, sign):
  import optuna
  path = str(tmp_path / 'study.db')
  trials = study_trials()
  search.write_study(path, 'pbt', space(), trials, metric)
  search.write_study(path, 'pbt', space(), trials, metric)  # rewritten whole, not added to
  assert os.listdir(tmp_path) == ['study.db']
  study = optuna.load_study(study_name='pbt', storage=f'sqlite:///{path}')
  assert study.direction.name == direction
  stored = study.trials
  assert len(stored) == 4
  states = [t.state.name for t in stored]
  assert states == ['COMPLETE', 'COMPLETE', 'PRUNED', 'COMPLETE']
  for got, trial in zip(stored, trials):
    assert got.params == trial.params
    assert got.value == sign * trial.value
    assert got.intermediate_values == {k: sign * v for k, v in trial.intermediate.items()}
    assert got.user_attrs == {'trial': trial.number, 'slot': trial.slot,
                              'start_step': trial.start_step, 'end_step': trial.end_step,
                              'parent': trial.parent}


def test_write_study_leaves_no_temp_file_on_error(tmp_path, monkeypatch):
  path = str(tmp_path / 'study.db')
  search.write_study(path, 'pbt', space(), study_trials(), 'val_loss')
  with pytest.raises(UserError, match="config.search.metric is 'accuracy'"):
    search.write_study(path, 'pbt', space(), study_trials(), 'accuracy')

  def broken(*args):
    assert any(name.endswith('.tmp') for name in os.listdir(tmp_path))  # the study aside
    raise RuntimeError('killed')

  monkeypatch.setattr(search, '_stored', broken)
  with pytest.raises(RuntimeError, match='killed'):
    search.write_study(path, 'pbt', space(), study_trials(), 'val_loss')
  assert os.listdir(tmp_path) == ['study.db']
  import optuna
  assert len(optuna.load_study(study_name='pbt', storage=f'sqlite:///{path}').trials) == 4
