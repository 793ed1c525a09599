"""A search's records for people: report.draw_search's picture of a lineage, and
metrics.write_hparams's files for TensorBoard's HParams dashboard, read back with TensorBoard's
own loader."""
import math
import os

import numpy as np
import pytest
from PIL import Image

from digitjax import metrics, report

try:
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import metadata as hparams_metadata
  TENSORBOARD = None
except ImportError as e:  # the 'tensorboard' extra, not the 'test' one
  TENSORBOARD = f'tensorboard is not installed (pip install .[tensorboard]): {e}'

needs_tensorboard = pytest.mark.skipif(TENSORBOARD is not None, reason=str(TENSORBOARD))

FIELDS = ('learning_rate', 'momentum')


def _params(rng):
  return {'learning_rate': float(10 ** rng.uniform(-3, -0.5)),
          'momentum': float(rng.uniform(0.5, 0.95))}


def _starts(slots, rng):
  return [{'step': 0, 'generation': 0, 'event': 'start', 'slot': s, 'trial': s,
           'new': _params(rng)} for s in range(slots)]


def pbt_lineage(slots, generations, diverged=(), ready=10, seed=0):
  """A lineage as search_steps writes one: every `ready` steps the bottom quarter copies a slot
  of the top quarter and explores; the slots of `diverged` (generation, slot) score null."""
  rng = np.random.default_rng(seed)
  records = _starts(slots, rng)
  params = [r['new'] for r in records]
  trial, k = slots, max(1, slots // 4)
  for g in range(1, generations + 1):
    scores = [None if (g, s) in diverged else float(rng.uniform(0.1, 2.0)) for s in range(slots)]
    order = sorted(range(slots), key=lambda s: (math.inf if scores[s] is None else scores[s], s))
    for slot in sorted(order[-k:]):
      donor = order[int(rng.integers(k))]
      explored = {f: v * float(rng.choice([0.8, 1.2])) for f, v in params[donor].items()}
      common = {'step': g * ready, 'generation': g, 'slot': slot, 'trial': trial}
      records += [{**common, 'event': 'exploit', 'parent_slot': donor, 'parent_trial': donor,
                   'replaced_trial': slot, 'old': params[slot], 'new': params[donor],
                   'score': scores[slot], 'parent_score': scores[donor]},
                  {**common, 'event': 'explore', 'old': params[donor], 'new': explored}]
      params[slot], trial = explored, trial + 1
  return records


def halving_lineage(slots, generations, diverged=(), ready=10, seed=0):
  """Culls and refills at every boundary: half the slots, those of `diverged` scoring null."""
  rng = np.random.default_rng(seed)
  records = _starts(slots, rng)
  params, starts, trial = [r['new'] for r in records], [0] * slots, slots
  for g in range(1, generations + 1):
    step = g * ready
    for slot in sorted(rng.choice(slots, slots // 2, replace=False).tolist()):
      score = None if (g, slot) in diverged else float(rng.uniform(0.1, 2.0))
      common = {'step': step, 'generation': g, 'slot': slot}
      new = _params(rng)
      records += [{**common, 'event': 'cull', 'trial': trial - 1, 'age': step - starts[slot],
                   'score': score, 'old': params[slot]},
                  {**common, 'event': 'refill', 'trial': trial, 'new': new}]
      params[slot], starts[slot], trial = new, step, trial + 1
  return records


def check_png(path):
  """A complete PNG of a readable size that is not blank."""
  assert os.path.getsize(path) > 10_000
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert 600 <= image.size[0] <= 2000 and 500 <= image.size[1] <= 2000, image.size
    pixels = np.asarray(image.convert('L'), np.float64)
  assert pixels.std() > 15, pixels.std()
  assert not os.path.exists(path + '.tmp')


# ---------------------------------------------------------------------------------------------
# draw_search


@pytest.mark.parametrize('slots', [8, 32])
def test_draws_a_pbt_search(tmp_path, slots):
  path = str(tmp_path / 'search.png')
  assert report.draw_search(path, pbt_lineage(slots, 12), 'val_loss') is None
  check_png(path)


@pytest.mark.parametrize('slots', [8, 32])
def test_draws_a_halving_search(tmp_path, slots):
  path = str(tmp_path / 'search.png')
  report.draw_search(path, halving_lineage(slots, 8), 'val_accuracy')
  check_png(path)


@pytest.mark.parametrize('lineage', [pbt_lineage, halving_lineage])
def test_a_null_score_is_drawn_as_diverged(tmp_path, lineage):
  records = lineage(8, 4, diverged={(1, 0), (1, 3), (2, 5), (3, 1), (3, 6)})
  assert any(r.get('score', 0) is None for r in records)
  path = str(tmp_path / 'search.png')
  report.draw_search(path, records, 'val_loss')
  check_png(path)


def test_draws_a_search_without_any_score(tmp_path):
  """Every fitness null (all diverged), or no boundary yet, or no record at all: no colour
  bar, still a picture."""
  everyone = {(g, s) for g in range(1, 4) for s in range(8)}
  for i, records in enumerate([pbt_lineage(8, 3, diverged=everyone), pbt_lineage(8, 0), []]):
    path = str(tmp_path / f'search{i}.png')
    report.draw_search(path, records, 'val_loss')
    with Image.open(path) as image:
      image.verify()


def test_draws_every_searchable_field(tmp_path):
  """Eight searched fields (one panel each) still fit in a readable picture."""
  fields = ('learning_rate', 'momentum', 'weight_decay', 'onecycle_pct_start',
            'augment.rotation', 'augment.zoom', 'augment.shift', 'model.dropout_rate')
  records = pbt_lineage(16, 6)
  for r in records:
    if 'new' in r:
      r['new'] = {f: r['new']['momentum'] * (i + 1) for i, f in enumerate(fields)}
  path = str(tmp_path / 'search.png')
  report.draw_search(path, records, 'val_loss')
  check_png(path)


# ---------------------------------------------------------------------------------------------
# write_hparams

TAGS = ['val_loss', 'val_accuracy']


def hparams_runs():
  return [{'name': f'slot{i}',
           'hparams': {'learning_rate': 0.01 * (i + 1), 'momentum': 0.5 + i / 10},
           'metrics': {'val_loss': [(10, 1.0 - i / 10), (20, 0.5 - i / 10)],
                       'val_accuracy': [(10, 0.5 + i / 100), (20, 0.75 + i / 100)]}}
          for i in range(3)]


def _load(path):
  accumulator = event_accumulator.EventAccumulator(path, size_guidance={'scalars': 0})
  accumulator.Reload()
  return accumulator


def _event_dirs(root):
  return sorted(os.path.relpath(d, root) for d, _, files in os.walk(root)
                if any('tfevents' in f for f in files))


@needs_tensorboard
def test_writes_the_experiment_and_one_session_per_run(tmp_path):
  root = str(tmp_path / 'hparams')
  runs = hparams_runs()
  metrics.write_hparams(root, list(FIELDS), runs, TAGS)
  folders = [e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e))]
  assert sorted(folders) == ['slot0', 'slot1', 'slot2']  # no stray timestamped run
  assert _event_dirs(root) == ['.', 'slot0', 'slot1', 'slot2']
  for folder in folders:  # nothing under a run's folder but its event file
    assert [f for f in os.listdir(os.path.join(root, folder)) if 'tfevents' not in f] == []
  top = _load(root)
  content = top.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
  assert list(content) == [hparams_metadata.EXPERIMENT_TAG]
  experiment = hparams_metadata.parse_experiment_plugin_data(
      content[hparams_metadata.EXPERIMENT_TAG])
  assert [h.name for h in experiment.hparam_infos] == list(FIELDS)
  assert [m.name.tag for m in experiment.metric_infos] == TAGS
  assert top.Tags()['scalars'] == []
  for run in runs:
    loaded = _load(os.path.join(root, run['name']))
    content = loaded.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = hparams_metadata.parse_session_start_info_plugin_data(
        content[hparams_metadata.SESSION_START_INFO_TAG])
    assert {k: v.number_value for k, v in start.hparams.items()} == run['hparams']
    assert hparams_metadata.SESSION_END_INFO_TAG in content
    assert sorted(loaded.Tags()['scalars']) == sorted(TAGS)
    for tag in TAGS:
      read = [(e.step, e.value) for e in loaded.Scalars(tag)]
      assert [s for s, _ in read] == [s for s, _ in run['metrics'][tag]]
      np.testing.assert_allclose([v for _, v in read], [v for _, v in run['metrics'][tag]],
                                 rtol=1e-6)  # float32 in the event file


@needs_tensorboard
def test_the_hparams_dashboard_shows_one_row_per_run(tmp_path):
  """TensorBoard's own HParams plugin lists a session group per run, with its hparams and the
  last value of each metric."""
  from tensorboard import context
  from tensorboard.backend.event_processing import data_provider
  from tensorboard.backend.event_processing import plugin_event_multiplexer
  from tensorboard.plugins import base_plugin
  from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups
  root = str(tmp_path / 'hparams')
  runs = hparams_runs()
  metrics.write_hparams(root, list(FIELDS), runs, TAGS)
  multiplexer = plugin_event_multiplexer.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(root)
  multiplexer.Reload()
  provider = data_provider.MultiplexerDataProvider(multiplexer, root)
  backend = backend_context.Context(base_plugin.TBContext(data_provider=provider, logdir=root))
  request = api_pb2.ListSessionGroupsRequest(
      start_index=0, slice_size=100, allowed_statuses=[api_pb2.STATUS_SUCCESS])
  response = list_session_groups.Handler(context.RequestContext(), backend, '', request).run()
  groups = {g.name: g for g in response.session_groups}
  assert sorted(groups) == ['slot0', 'slot1', 'slot2']
  for run in runs:
    group = groups[run['name']]
    assert {k: v.number_value for k, v in group.hparams.items()} == run['hparams']
    last = {m.name.tag: (m.training_step, m.value) for m in group.metric_values}
    assert sorted(last) == sorted(TAGS)
    for tag in TAGS:
      assert last[tag][0] == run['metrics'][tag][-1][0]
      assert last[tag][1] == pytest.approx(run['metrics'][tag][-1][1], rel=1e-6)


@needs_tensorboard
def test_writing_again_replaces_the_rows_and_keeps_other_files(tmp_path):
  """A second call (the search went on) replaces what the first wrote, instead of doubling
  each session and scalar; another writer's event file in a run's folder stays."""
  root = tmp_path / 'hparams'
  runs = hparams_runs()
  metrics.write_hparams(str(root), list(FIELDS), runs, TAGS)
  other = root / 'slot0' / 'events.out.tfevents.1.other'
  other.write_bytes(b'')
  for run in runs:
    for values in run['metrics'].values():
      values.append((30, 0.9))
  metrics.write_hparams(str(root), list(FIELDS), runs, TAGS)
  assert _event_dirs(str(root)) == ['.', 'slot0', 'slot1', 'slot2']
  for name in ('.', 'slot1'):
    assert len([f for f in os.listdir(root / name) if 'tfevents' in f]) == 1
  assert other.exists()
  loaded = _load(str(root / 'slot1'))
  assert [e.step for e in loaded.Scalars('val_loss')] == [10, 20, 30]
  assert len(loaded.PluginTagToContent(hparams_metadata.PLUGIN_NAME)) == 2  # start and end


@needs_tensorboard
def test_missing_values_and_non_finite_metrics_are_left_out(tmp_path):
  root = str(tmp_path / 'hparams')
  runs = [{'name': 'trial0', 'hparams': {'learning_rate': 0.1},
           'metrics': {'val_loss': [(10, 1.0), (20, float('nan')), (30, None)]}},
          {'name': 'trial1', 'hparams': {'learning_rate': 0.2, 'momentum': 0.9}, 'metrics': {}}]
  metrics.write_hparams(root, list(FIELDS), runs, TAGS)
  experiment = hparams_metadata.parse_experiment_plugin_data(
      _load(root).PluginTagToContent('hparams')[hparams_metadata.EXPERIMENT_TAG])
  assert [h.name for h in experiment.hparam_infos] == list(FIELDS)
  first = _load(os.path.join(root, 'trial0'))
  start = hparams_metadata.parse_session_start_info_plugin_data(
      first.PluginTagToContent('hparams')[hparams_metadata.SESSION_START_INFO_TAG])
  assert set(start.hparams) == {'learning_rate'}
  assert [(e.step, e.value) for e in first.Scalars('val_loss')] == [(10, 1.0)]
  assert _load(os.path.join(root, 'trial1')).Tags()['scalars'] == []


def test_run_names_must_be_distinct_folder_names(tmp_path):
  for names in (['slot0', 'slot0'], ['a/b'], ['..'], ['']):
    runs = [{'name': n, 'hparams': {}, 'metrics': {}} for n in names]
    with pytest.raises(ValueError, match='run names'):
      metrics.write_hparams(str(tmp_path / 'hparams'), list(FIELDS), runs, TAGS)
  assert not os.path.exists(tmp_path / 'hparams')
