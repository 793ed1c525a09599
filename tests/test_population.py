"""Populations: the sweep syntax, members equal to their single runs, selection on validation,
results a person can read, resume after a kill, members shared out over processes."""
import csv
import json
import os
import signal

import jax
import numpy as np
import pytest

import digitjax
from conftest import launch_args, small_config, ROOT, wait_for
from digitjax import members as members_lib, steps
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError
from test_train import final_params, _params_equal


def _sweep(idx_dir, tfds_dir, grid='', members=(), **over):
  return small_config(idx_dir, tfds_dir, **{'sweep.grid': grid, 'sweep.members': members, **over})


# ---------------------------------------------------------------------------------------------
# Syntax and checks


def test_grid_and_member_lists_combine_in_order(config):
  config.sweep.grid = 'learning_rate=0.003,0.1; model.conv_features=(8,16,16),(32, 64, 64)'
  config.sweep.members = ('', 'model.batch_norm=True; nesterov=True')
  members = members_lib.members_of(config, '/w')
  assert [m.name for m in members] == [
      'learning_rate=0.003,model.conv_features=(8,16,16)',
      'learning_rate=0.003,model.conv_features=(32,64,64)',
      'learning_rate=0.1,model.conv_features=(8,16,16)',
      'learning_rate=0.1,model.conv_features=(32,64,64)',
      'model.batch_norm=True,nesterov=True,learning_rate=0.003,model.conv_features=(8,16,16)',
      'model.batch_norm=True,nesterov=True,learning_rate=0.003,model.conv_features=(32,64,64)',
      'model.batch_norm=True,nesterov=True,learning_rate=0.1,model.conv_features=(8,16,16)',
      'model.batch_norm=True,nesterov=True,learning_rate=0.1,model.conv_features=(32,64,64)']
  last = members[-1].config
  assert (last.learning_rate, tuple(last.model.conv_features), last.model.batch_norm,
          last.nesterov) == (0.1, (32, 64, 64), True, True)
  assert members[-1].files.dir == os.path.join(
      '/w', 'members', '07-model.batch_norm=True,nesterov=True,learning_rate=0.1,'
                       'model.conv_features=(32,64,64)')
  # The base config is untouched; members share its holdout and have no sweep of their own.
  assert config.learning_rate == 0.02 and all(m.config.sweep.grid == '' for m in members)
  assert {m.config.data.split_seed for m in members} == {config.seed}
  # Widths and BatchNorm are structure: four groups of two (the learning rates).
  assert [[m.index for m in g] for g in members_lib.groups_of(members)] == [[0, 2], [1, 3],
                                                                           [4, 6], [5, 7]]


def test_a_config_without_a_sweep_is_a_single_run_in_the_workdir(config):
  [member] = members_lib.members_of(config, '/w')
  assert (member.name, member.overrides, member.files.dir) == ('base', {}, '/w')
  assert member.config is config


@pytest.mark.parametrize('grid, members, message', [
    ('learnig_rate=0.1,0.2', (), r"config.sweep member 0 \(learnig_rate=0.1\): config.learnig_rate "
                                 r"is not a config field; did you mean 'learning_rate'\?"),
    ('learning_rate=0.1,-1', (), r"config.sweep member 1 \(learning_rate=-1\): "
                                 r"config.learning_rate=-1.0 is invalid"),
    ('seed=0,1', ('', 'batch_size=big'), r"member 2 \(batch_size=big,seed=0\): "
                                         r"config.batch_size='big' has the wrong type"),
    ('dataset=mnist,fashion_mnist', (), r'dataset is shared by every member'),
    ('seed=0,1', ('seed=3',), r'seed is set both by config.sweep.members and by'),
    ('seed=0,0', (), r'seed lists a value twice'),
    ('seed', (), r"'seed' is not field=v1,v2"),
    ('', ('', 'seed=0'), r'member 1 \(seed=0\) is the same config as member 0'),
    ('', ('lr 0.1',), r"config.sweep.members\[0\]: 'lr 0.1' is not field=value"),
])
def test_bad_sweeps_are_one_line_errors_naming_the_member(config, grid, members, message):
  config.sweep.grid, config.sweep.members = grid, members
  with pytest.raises(UserError, match=message) as e:
    members_lib.members_of(config, '/w')
  assert '\n' not in str(e.value)


def test_selection_settings_are_checked(config):
  config.sweep.grid = 'seed=0,1'
  config.sweep.select = 'top3'
  with pytest.raises(UserError, match='asks for more members than the population has'):
    members_lib.members_of(config, '/w')
  config.sweep.select = 'worst'
  with pytest.raises(UserError, match="'best', 'ensemble' or 'top<k>'"):
    members_lib.members_of(config, '/w')
  config.sweep.select, config.validation_fraction = 'best', 0.0
  with pytest.raises(UserError, match='leaves no validation split'):
    members_lib.members_of(config, '/w')
  config.sweep.select = 'ensemble'
  assert len(members_lib.members_of(config, '/w')) == 2


def _outcome(i, val, test):
  member = members_lib.Member(i, f'm{i}', {}, None, None)
  return members_lib.Outcome(member, {'val_accuracy': val, 'test_accuracy': test}, [],
                             np.zeros((1, 10)), np.zeros((1, 10)))


def test_selection_looks_at_validation_only():
  # Member 1 is the best on test, member 2 on validation: validation decides.
  outcomes = [_outcome(0, 0.90, 0.91), _outcome(1, 0.95, 0.99), _outcome(2, 0.97, 0.93),
              _outcome(3, 0.96, 0.98)]
  assert members_lib.select(outcomes, 'best') == [2]
  assert members_lib.select(outcomes, 'top2') == [2, 3]
  assert members_lib.select(outcomes, 'ensemble') == [0, 1, 2, 3]
  outcomes[2].test_logits = None  # diverged: never delivered
  assert members_lib.select(outcomes, 'best') == [3]


def test_a_search_selects_on_its_metric_lower_loss_first_a_blown_up_one_last():
  outcomes = [_outcome(i, 0.9, 0.9) for i in range(4)]
  for o, loss in zip(outcomes, (0.05, float('nan'), 0.03, 0.04)):
    o.results['val_loss'] = loss
  assert members_lib.select(outcomes, 'top3', 'val_loss') == [2, 3, 0]
  assert members_lib.select(outcomes, 'top4', 'val_loss')[-1] == 1


# ---------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope='module')
def map_population(idx_dir, tfds_dir, tmp_path_factory):
  """Learning rates 0.02 and 0 x seeds 0 and 1, one epoch, members one after another."""
  config = _sweep(idx_dir, tfds_dir, 'learning_rate=0.02,0.0; seed=0,1')
  workdir = tmp_path_factory.mktemp('population') / 'run'
  return config, workdir, digitjax.train(config, str(workdir))


def test_each_member_is_its_single_run_bit_for_bit(map_population, idx_dir, tfds_dir, tmp_path):
  config, workdir, results = map_population
  members = members_lib.members_of(config, str(workdir))
  for m in members[:2]:  # learning rate 0.02, seeds 0 and 1: one compiled step for both
    alone = small_config(idx_dir, tfds_dir, learning_rate=m.config.learning_rate,
                         seed=m.config.seed, **{'data.split_seed': config.seed})
    single = digitjax.train(alone, str(tmp_path / m.name))
    assert _params_equal(final_params(m.config, m.files.dir), final_params(alone, tmp_path / m.name))
    assert results['members'][m.index]['test_loss'] == single['test_loss']
  # A member with learning rate 0 keeps its initial parameters while the others move.
  frozen = members[2].config
  start, _, _ = steps.create(frozen, jax.random.key(frozen.seed))
  assert _params_equal(final_params(frozen, members[2].files.dir), start.params)
  assert not _params_equal(final_params(members[0].config, members[0].files.dir),
                           final_params(members[1].config, members[1].files.dir))


def test_results_table_and_csv_describe_every_member(map_population, capsys):
  config, workdir, results = map_population
  assert results == json.loads((workdir / 'results.json').read_text())
  by_name = {m['name']: m for m in results['members']}
  assert list(by_name) == ['learning_rate=0.02,seed=0', 'learning_rate=0.02,seed=1',
                           'learning_rate=0.0,seed=0', 'learning_rate=0.0,seed=1']
  for m in results['members']:
    own = json.loads((workdir / m['dir'] / 'results.json').read_text())
    assert (m['test_accuracy'], m['val_accuracy'], m['checkpoint_step']) == (
        own['test_accuracy'], own['val_accuracy'], own['checkpoint_step'])
    assert m['checkpoint_step'] == 22
  # The frozen members stay near chance; the delivered one is the best by validation.
  assert by_name['learning_rate=0.0,seed=0']['val_accuracy'] < 0.5
  best = max(results['members'], key=lambda m: (m['val_accuracy'], -m['index']))
  assert results['selected'] == [best['name']] and best['selected']
  assert results['test_accuracy'] == best['test_accuracy']
  rows = list(csv.DictReader(open(workdir / 'population.csv')))
  assert [r['name'] for r in rows] == list(by_name)
  assert [r['learning_rate'] for r in rows] == ['0.02', '0.02', '0.0', '0.0']
  assert [float(r['test_accuracy']) for r in rows] == [m['test_accuracy'] for m in
                                                       results['members']]
  # TensorBoard: one run folder per member, named by its overrides.
  assert sorted(os.listdir(workdir / 'tensorboard')) == [
      '00-learning_rate=0.02,seed=0', '01-learning_rate=0.02,seed=1',
      '02-learning_rate=0.0,seed=0', '03-learning_rate=0.0,seed=1']
  # Run again: a finished population only reports: the table it prints is results.json's.
  capsys.readouterr()
  again = digitjax.train(config, str(workdir))
  out = capsys.readouterr().out
  assert again == results and 'Epoch' not in out
  on_disk = json.loads((workdir / 'results.json').read_text())
  rows, delivered = _printed_table(out)
  fmt = lambda x: '-' if x is None else f'{x:.4f}'
  assert rows == {m['name']: [fmt(m[k]) for k in ('val_accuracy', 'best_val_accuracy',
                                                    'val_loss', 'test_accuracy', 'test_loss')]
                  + [f'{m["train_seconds"]:.1f}'] + (['*'] if m['selected'] else [])
                  for m in on_disk['members']}
  assert delivered == (f'(* delivered: select=best; test_accuracy '
                       f'{on_disk["test_accuracy"]:.4f}, test_loss {on_disk["test_loss"]:.4f})')


def _printed_table(out: str) -> tuple[dict, str]:
  """({member: its printed cells}, the 'delivered' line) of the table in `out`."""
  lines = out.splitlines()
  start = next(i for i, l in enumerate(lines) if l.split()[:2] == ['member', 'val_acc'])
  end = next(i for i in range(start, len(lines)) if lines[i].startswith('(* delivered'))
  return {l.split()[0]: l.split()[1:] for l in lines[start + 1:end]}, lines[end]


def test_each_members_epoch_seconds_add_up_to_its_train_seconds(map_population):
  # 'map': each member's epoch time is its own steps' (not the group's, 4 members long).
  _, workdir, results = map_population
  for m in results['members']:
    history = workdir_lib.read_jsonl(str(workdir / m['dir'] / 'metrics.jsonl'))
    epochs = [r['epoch_seconds'] for r in history if 'epoch_seconds' in r]
    assert len(epochs) == 1
    assert sum(epochs) == pytest.approx(m['train_seconds'], rel=1e-9, abs=0)


def test_diverged_members_stop_alone_and_are_reported(map_population, idx_dir, tfds_dir,
                                                      tmp_path, capsys):
  # Member 1's loss explodes but stays finite (4.8e29 at 7% accuracy); member 2's becomes
  # non-finite, alone in its group (another structure); the base member goes on.
  config = _sweep(idx_dir, tfds_dir, '', ('', 'learning_rate=1.0',
                                          'learning_rate=1e20; model.dense_features=50'),
                  **{'sweep.select': 'top2'})
  workdir = tmp_path / 'pop'
  results = digitjax.train(config, str(workdir))
  out = capsys.readouterr().out
  base, exploded, nan = results['members']
  # The base member is its single run (map_population's member 0: the same config).
  assert base['test_loss'] == map_population[2]['members'][0]['test_loss']
  assert base['checkpoint_step'] == 22 and base['diverged_at_step'] is None
  assert exploded['diverged_at_step'] == 22
  assert 'above 100 x log(10) = 230' in exploded['diverged_reason']
  assert nan['diverged_at_step'] == 1 and nan['diverged_reason'] == 'non-finite loss'
  for m in (exploded, nan):
    own = json.loads((workdir / m['dir'] / 'results.json').read_text())
    assert own['diverged_at_step'] == m['diverged_at_step'] and own['checkpoint_step'] is None
  # Delivered: the one member left of top2, with a note (log and results.json).
  assert results['selected'] == ['base'] and results['test_loss'] == base['test_loss']
  assert results['selection_note'] == (
      'select=top2 asked for 2 members; 2 diverged (learning_rate=1.0, learning_rate=1e+20,'
      'model.dense_features=50), so the delivered model combines 1: base')
  assert f'Note: {results["selection_note"]}' in out
  rows = {r['name']: r for r in csv.DictReader(open(workdir / 'population.csv'))}
  assert [rows[m['name']]['diverged_at_step'] for m in results['members']] == ['', '22', '1']
  printed = {name: ' '.join(cells) for name, cells in _printed_table(out)[0].items()}
  assert printed[exploded['name']].endswith(
      f'diverged at step 22 ({exploded["diverged_reason"]})')
  assert printed[nan['name']].endswith('diverged at step 1 (non-finite loss)')


def test_the_base_member_alone_in_its_group_is_a_member_not_a_run(idx_dir, tfds_dir, tmp_path,
                                                                  capsys):
  # The base config diverges alone in its group (the other member is another structure): it
  # stops as a member does, named in its lines, and the population goes on.
  config = _sweep(idx_dir, tfds_dir, '', ('', 'learning_rate=0.02; model.dense_features=50'),
                  learning_rate=1e20)
  results = digitjax.train(config, str(tmp_path / 'pop'))
  out = capsys.readouterr().out
  base, other = results['members']
  assert base['name'] == 'base' and base['diverged_at_step'] == 1
  assert other['diverged_at_step'] is None and results['selected'] == [other['name']]
  assert '[base] Epoch' not in out and '[base] the training loss became non-finite' in out
  assert f'[{other["name"]}] Test: loss' in out


def test_the_config_is_checked_and_its_sweep_parsed_once_per_path(map_population, monkeypatch):
  # Each fact once: training (here of a population already trained: it only reports) and a mode
  # check the base config once, each member's own config once, and parse the sweep once.
  from digitjax import configlib, modes
  config, workdir, results = map_population
  calls = {}

  def counted(module, name):
    original = getattr(module, name)

    def count(*args, **kwargs):
      calls[name] = calls.get(name, 0) + 1
      return original(*args, **kwargs)
    monkeypatch.setattr(module, name, count)
  counted(configlib, 'validate')
  counted(members_lib, 'parse_grid')
  assert digitjax.train(config, str(workdir)) == results
  assert calls == {'validate': 1 + 4, 'parse_grid': 1}
  calls.clear()
  assert modes.run(config, str(workdir), modes.Request('eval', 'latest')) == 0
  assert calls == {'validate': 1 + 4, 'parse_grid': 1}


def test_another_population_in_the_same_workdir_is_refused(map_population, idx_dir, tfds_dir):
  config, workdir, _ = map_population
  other = _sweep(idx_dir, tfds_dir, 'learning_rate=0.05,0.0; seed=0,1')
  before = {m: os.listdir(workdir / 'members' / m / 'checkpoints')
            for m in os.listdir(workdir / 'members')}
  with pytest.raises(UserError, match=r'holds another population \(4 members; member 0 was '
                                      r'learning_rate=0.02,seed=0, now learning_rate=0.05,seed=0'):
    digitjax.train(other, str(workdir))
  after = {m: os.listdir(workdir / 'members' / m / 'checkpoints')
           for m in os.listdir(workdir / 'members')}
  assert after == before  # nothing trained, nothing removed


@pytest.mark.slow
def test_vmapped_members_equal_their_single_runs_to_float_tolerance(idx_dir, tfds_dir, tmp_path):
  # Per-member learning rates, dropout and augmentation under vmap: each member's steps are its
  # single run's up to float rounding (vmap batches the products, so they round differently):
  # measured 5e-10 after 1 step and 3e-8 after 5. Training amplifies any rounding difference
  # (after a whole epoch of 22 steps: 3e-5 plain, 2e-3 with augmentation and dropout), so the
  # comparison is made early, where a wrong per-member number would show at once.
  extra = {'augment.enabled': True, 'model.dropout_rate': 0.1}
  config = _sweep(idx_dir, tfds_dir, 'learning_rate=0.02,0.01; seed=0,1', num_epochs=5 / 22,
                  **{'sweep.execution': 'vmap', **extra})
  digitjax.train(config, str(tmp_path / 'pop'))
  members = members_lib.members_of(config, str(tmp_path / 'pop'))
  moved = []
  for m in members:
    # The same layers as the vmapped step (one gradient chunk): only vmap's rounding differs.
    alone = small_config(idx_dir, tfds_dir, learning_rate=m.config.learning_rate,
                         seed=m.config.seed, grad_chunks=1, num_epochs=5 / 22,
                         **{'data.split_seed': config.seed, **extra})
    digitjax.train(alone, str(tmp_path / m.name))
    start, _, _ = steps.create(alone, jax.random.key(m.config.seed))
    for a, b, c in zip(jax.tree.leaves(final_params(m.config, m.files.dir)),
                       jax.tree.leaves(final_params(alone, tmp_path / m.name)),
                       jax.tree.leaves(start.params)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
      moved.append(float(np.abs(np.asarray(b) - np.asarray(c)).max()))
  assert max(moved) > 1e-3  # the five steps did move the parameters far beyond that tolerance


@pytest.mark.slow
def test_ensemble_of_structural_groups_averages_member_probabilities(idx_dir, tfds_dir,
                                                                     tmp_path):
  from digitjax import data, inference, modes
  config = _sweep(idx_dir, tfds_dir, 'seed=0,1', ('', 'model.batch_norm=True'),
                  **{'sweep.select': 'ensemble', 'plots': True})
  results = digitjax.train(config, str(tmp_path / 'pop'))
  assert len(results['members']) == 4 and len(results['selected']) == 4
  # The delivered figures are those of the mean of the members' softmax probabilities.
  target = modes.target(config, str(tmp_path / 'pop'))
  restored = modes.Restored(target, 'latest', 'eval')
  splits = data.load_splits(config)
  member_logits = restored.member_logits(splits.test['image'])
  mean = np.mean([inference.probabilities(l) for l in member_logits], axis=0)
  combined = inference.combine_logits(member_logits)
  np.testing.assert_allclose(np.exp(combined), mean, rtol=1e-5, atol=1e-7)
  expected_loss = -np.mean(np.log(mean[np.arange(len(mean)), splits.test['label']]))
  assert results['test_loss'] == pytest.approx(expected_loss, rel=1e-5)
  assert results['test_accuracy'] == np.mean(mean.argmax(-1) == splits.test['label'])
  for name in ('population_curves.png', 'population_fields.png', 'confusion_matrix.png'):
    assert (tmp_path / 'pop' / 'plots' / name).stat().st_size > 1000


@pytest.mark.slow
def test_sigkill_mid_population_then_rerun_equals_an_uninterrupted_run(
    idx_dir, tfds_dir, tmp_path, processes):
  args = lambda w, *extra: launch_args(
      '--config=configs/default.py', f'--workdir={w}', f'--config.data.manual_dir={idx_dir}',
      f'--config.data.data_dir={tfds_dir}', '--config.data.verify_checksums=False',
      '--config.batch_size=16', '--config.num_epochs=3', '--config.eval_batch_size=50',
      '--config.plots=False', '--config.chunk_steps=5', '--config.augment.enabled=True',
      "--config.sweep.grid=learning_rate=0.02,0.01; seed=0,1", *extra)
  straight = processes.run(args(tmp_path / 'straight'), cwd=ROOT)
  assert straight.returncode == 0, straight.stderr[-2000:]
  workdir = tmp_path / 'killed'
  run = processes.popen(args(workdir, '--debug_pause_at=step:30'),  # mid-epoch 2 (22 steps each)
                        cwd=ROOT, stdout=open(tmp_path / 'out', 'w'),
                        stderr=open(tmp_path / 'err', 'w'))
  wait_for(run, (tmp_path / 'err').read_text, 'digitjax: paused at step')
  run.kill()
  run.wait()
  again = processes.run(args(workdir), cwd=ROOT)
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'Resuming the group from checkpoint at step 22' in again.stdout
  done = json.loads((workdir / 'results.json').read_text())
  expected = json.loads((tmp_path / 'straight' / 'results.json').read_text())
  for a, b in zip(done['members'], expected['members']):
    assert (a['name'], a['test_loss'], a['val_loss']) == (b['name'], b['test_loss'],
                                                          b['val_loss'])
    history = workdir_lib.read_jsonl(str(workdir / a['dir'] / 'metrics.jsonl'))
    assert [r['epoch'] for r in history if 'epoch' in r] == [1, 2, 3]  # none twice


def _population_launch(idx_dir, tfds_dir):
  return lambda w, *extra: launch_args(
      '--config=configs/default.py', f'--workdir={w}', f'--config.data.manual_dir={idx_dir}',
      f'--config.data.data_dir={tfds_dir}', '--config.data.verify_checksums=False',
      '--config.batch_size=16', '--config.num_epochs=3', '--config.eval_batch_size=50',
      '--config.plots=False', '--config.chunk_steps=5',
      "--config.sweep.grid=learning_rate=0.02,0.01; seed=0,1", *extra)


def _sigterm_at_pause(processes, args, tmp_path, name):
  """Runs `args` (with --debug_pause_at), sends SIGTERM at the pause: (stdout, stderr)."""
  out, err = tmp_path / f'{name}.out', tmp_path / f'{name}.err'
  run = processes.popen(args, cwd=ROOT, stdout=open(out, 'w'), stderr=open(err, 'w'))
  wait_for(run, err.read_text, 'digitjax: paused at')
  run.send_signal(signal.SIGTERM)
  assert run.wait() == 143, err.read_text()[-2000:]
  return out.read_text(), err.read_text()


def _same_numbers(workdir, expected) -> None:
  done = json.loads((workdir / 'results.json').read_text())
  assert (done['test_loss'], done['test_accuracy'], done['selected']) == (
      expected['test_loss'], expected['test_accuracy'], expected['selected'])
  for a, b in zip(done['members'], expected['members']):
    assert (a['name'], a['test_loss'], a['val_loss']) == (b['name'], b['test_loss'],
                                                          b['val_loss'])
    history = workdir_lib.read_jsonl(str(workdir / a['dir'] / 'metrics.jsonl'))
    assert [r['epoch'] for r in history if 'epoch' in r] == [1, 2, 3]  # none twice
    # Its epochs' seconds add up to its training seconds, across the stops and resumes.
    assert sum(r['epoch_seconds'] for r in history if 'epoch' in r) == pytest.approx(
        a['train_seconds'], rel=1e-9, abs=0)


@pytest.mark.slow
def test_sigterm_mid_population_and_while_selecting_then_the_same_command_equals_a_clean_run(
    idx_dir, tfds_dir, tmp_path, processes):
  args = _population_launch(idx_dir, tfds_dir)
  straight = processes.run(args(tmp_path / 'straight'), cwd=ROOT)
  assert straight.returncode == 0, straight.stderr[-2000:]
  expected = json.loads((tmp_path / 'straight' / 'results.json').read_text())
  workdir = tmp_path / 'stopped'
  # Mid-epoch 2 (22 steps each, chunks of 5 from 22): every member saved at step 32, then 143.
  out, _ = _sigterm_at_pause(processes, args(workdir, '--debug_pause_at=step:32'), tmp_path,
                             'step')
  assert 'Stopped by SIGTERM at step 32; checkpoint saved' in out
  # Resumed, trained to the end; stopped before the members' test logits: 143, one line.
  out, err = _sigterm_at_pause(processes, args(workdir, '--debug_pause_at=selecting'),
                               tmp_path, 'selecting')
  assert 'Resuming the group from checkpoint at step 32' in out
  assert err.strip().splitlines()[-1].startswith(
      "stopped by SIGTERM while evaluating the population's members")
  assert not (workdir / 'results.json').exists()
  again = processes.run(args(workdir), cwd=ROOT)
  assert again.returncode == 0, again.stderr[-2000:]
  _same_numbers(workdir, expected)
  # Members trained and tested, the population's summary missing: it evaluates them again,
  # and a SIGTERM there stops it too; the same command then makes the same summary.
  os.remove(tmp_path / 'straight' / 'results.json')
  _, err = _sigterm_at_pause(processes, args(tmp_path / 'straight', '--debug_pause_at=selecting'),
                             tmp_path, 'summary')
  assert err.strip().splitlines()[-1].startswith(
      "stopped by SIGTERM while evaluating the population's members")
  again = processes.run(args(tmp_path / 'straight'), cwd=ROOT)
  assert again.returncode == 0, again.stderr[-2000:]
  _same_numbers(tmp_path / 'straight', expected)
