"""--mode=eval and the targets of the modes: a run, a member, a population's selection. A
checkpoint evaluated again gives the numbers training wrote, bit for bit."""
import json
import os

import numpy as np
import pytest

import digitjax
from conftest import ROOT, launch_args, small_config, workdir_snapshot
from digitjax import data, inference, metrics, modes
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError


@pytest.fixture(scope='module')
def run(idx_dir, tfds_dir, tmp_path_factory):
  """One synthetic run of two epochs (checkpoints at steps 22 and 44), shared by the module."""
  config = small_config(idx_dir, tfds_dir, num_epochs=2)
  workdir = str(tmp_path_factory.mktemp('eval_run'))
  return config, workdir, digitjax.train(config, workdir)


def test_eval_reproduces_results_json_exactly(run, capsys):
  config, workdir, results = run
  result = modes.run_eval(config, workdir, str(results['checkpoint_step']), 'test')
  assert result['test_accuracy'] == results['test_accuracy']
  assert result['test_loss'] == results['test_loss']
  assert result['checkpoint_step'] == results['checkpoint_step'] == 44
  with open(os.path.join(workdir, 'eval.json')) as f:
    assert json.load(f) == result
  # Per-class accuracy: the share of each digit's test images that eval's own logits get right.
  restored = modes.Restored(modes.target(config, workdir), '44', 'eval')
  test = data.load_splits(config).test
  predicted = restored.member_logits(test['image'])[0].argmax(-1)
  for digit, accuracy in result['test_per_class_accuracy'].items():
    mine = test['label'] == int(digit)
    assert accuracy == (float(np.mean(predicted[mine] == int(digit))) if mine.any() else None)
  out = capsys.readouterr().out
  assert 'Checkpoint step 44 (44): test_accuracy' in out and 'Per-class accuracy: 0 ' in out


def test_other_splits_use_their_prefix_and_match_training(run):
  config, workdir, _ = run
  history = metrics.read_history(workdir_lib.RunFiles.of(workdir))
  val = modes.run_eval(config, workdir, 'latest', 'validation')
  assert val['val_accuracy'] == history[-1]['val_accuracy']
  assert val['val_loss'] == history[-1]['val_loss']
  assert val['val_examples'] == 40 and 'test_accuracy' not in val
  first = modes.run_eval(config, workdir, '22', 'validation')
  assert first['val_accuracy'] == history[0]['val_accuracy']
  assert modes.run_eval(config, workdir, 'best', 'train')['train_examples'] == 360


def test_best_latest_and_step_choose_the_checkpoint(run):
  config, workdir, _ = run
  history = metrics.read_history(workdir_lib.RunFiles.of(workdir))
  best_epoch = max(history, key=lambda r: (r['val_accuracy'], r['epoch']))['epoch']
  checkpoints = inference.open_checkpoints(workdir_lib.RunFiles.of(workdir))
  try:
    assert inference.select_step(checkpoints, 'best') == 22 * best_epoch
    assert inference.select_step(checkpoints, 'latest') == 44
    assert inference.select_step(checkpoints, '22') == 22
    with pytest.raises(UserError, match=r'no checkpoint at that step .* steps \[22, 44\]'):
      inference.select_step(checkpoints, '23')
    with pytest.raises(UserError, match="--checkpoint='newest' is unknown"):
      inference.select_step(checkpoints, 'newest')
  finally:
    checkpoints.close()


def test_predict_checkpoint_step_gives_that_checkpoints_predictions(run, tmp_path):
  # --checkpoint=22 and --checkpoint=44: each the predictions of its own checkpoint's model.
  config, workdir, _ = run
  x = data.load_splits(config).test['image'][:50]
  np.save(tmp_path / 'digits.npy', x)
  confidences = {}
  for step in ('22', '44'):
    output = str(tmp_path / f'step{step}.csv')
    assert modes.run_predict(config, workdir, [str(tmp_path / 'digits.npy')], output,
                             checkpoint=step) == 0
    with open(output) as f:
      rows = [line.split(',') for line in f.read().splitlines()[1:]]
    restored = modes.Restored(modes.target(config, workdir), step, 'predict')
    assert restored.step == int(step)
    probabilities = inference.probabilities(restored.member_logits(x)[0])
    assert [int(p) for _, p, _ in rows] == probabilities.argmax(-1).tolist()
    assert [float(c) for _, _, c in rows] == [float(f'{p.max():.4f}') for p in probabilities]
    confidences[step] = [float(c) for _, _, c in rows]
  assert confidences['22'] != confidences['44']  # two models, told apart
  with pytest.raises(UserError, match=r'--checkpoint=23: no checkpoint at that step'):
    modes.run_predict(config, workdir, [str(tmp_path / 'digits.npy')], checkpoint='23')


@pytest.mark.parametrize('field, value', [('seed', 3), ('validation_fraction', 0.2),
                                          ('data.max_train_examples', 300),
                                          ('data.split_seed', 5)])
def test_eval_refuses_a_config_whose_data_split_differs(run, field, value):
  # The split decides which examples are validation and which were trained on: evaluating
  # under another split would report figures of the wrong examples.
  config, workdir, _ = run
  other = small_config(config.data.manual_dir, config.data.data_dir, num_epochs=2,
                       **{field: value})
  with pytest.raises(UserError, match=rf'{field}=.* in the checkpoint but {value}'):
    modes.run_eval(other, workdir, 'latest', 'test')


def test_missing_checkpoints_and_other_configs_are_user_errors(run, tmp_path):
  config, workdir, _ = run
  with pytest.raises(UserError, match='no checkpoint in'):
    modes.run_eval(config, str(tmp_path / 'untrained'))
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(UserError, match='no checkpoint in'):
    modes.run_eval(config, str(tmp_path / 'empty'))
  wider = small_config(config.data.manual_dir, config.data.data_dir,
                       **{'model.dense_features': 128})
  with pytest.raises(UserError, match='model.dense_features=100 in the checkpoint but 128'):
    modes.run_eval(wider, workdir)
  with pytest.raises(UserError, match='trained without config.sweep, so it has no members'):
    modes.run_eval(config, workdir, member='0')


@pytest.mark.slow
def test_eval_command_writes_eval_json_and_changes_nothing_else(run, processes):
  config, workdir, results = run
  before = workdir_snapshot(workdir, skip=('eval.json',))
  proc = processes.run(launch_args(
      '--config=configs/default.py', f'--workdir={workdir}', '--mode=eval',
      '--checkpoint=latest', f'--config.data.manual_dir={config.data.manual_dir}',
      f'--config.data.data_dir={config.data.data_dir}', '--config.data.verify_checksums=False',
      '--config.batch_size=16', '--config.eval_batch_size=50'), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f'test_accuracy {results["test_accuracy"]:.4f}' in proc.stdout
  with open(os.path.join(workdir, 'eval.json')) as f:
    written = json.load(f)
  assert written['test_accuracy'] == results['test_accuracy']
  assert written['checkpoint'] == 'latest' and written['checkpoint_step'] == 44
  assert workdir_snapshot(workdir, skip=('eval.json',)) == before


# ---------------------------------------------------------------------------------------------
# Populations


@pytest.fixture(scope='module')
def pop(idx_dir, tfds_dir, tmp_path_factory):
  config = small_config(idx_dir, tfds_dir, **{'sweep.grid': 'seed=0,1,2',
                                              'sweep.select': 'top2'})
  workdir = str(tmp_path_factory.mktemp('pop') / 'run')
  return config, workdir, digitjax.train(config, workdir)


def test_eval_of_a_population_reproduces_its_selection_and_each_member(pop):
  config, workdir, results = pop
  assert len(results['selected']) == 2
  result = modes.run_eval(config, workdir, 'latest', 'test')
  assert (result['test_accuracy'], result['test_loss']) == (results['test_accuracy'],
                                                            results['test_loss'])
  assert result['members'] == results['selected']
  assert os.path.exists(os.path.join(workdir, 'eval.json'))
  for m in results['members']:
    one = modes.run_eval(config, workdir, 'latest', 'test', member=str(m['index']))
    assert (one['test_accuracy'], one['test_loss']) == (m['test_accuracy'], m['test_loss'])
    assert os.path.exists(os.path.join(workdir, m['dir'], 'eval.json'))
  by_name = modes.run_eval(config, workdir, 'latest', 'test', member=results['members'][1]['name'])
  assert by_name['test_loss'] == results['members'][1]['test_loss']
  with pytest.raises(UserError, match=r'--member=7 is not a member of this population'):
    modes.run_eval(config, workdir, member='7')


def test_an_unfinished_population_has_no_selection_yet(pop, tmp_path):
  config, workdir, _ = pop
  import shutil
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  (copy / 'results.json').unlink()
  with pytest.raises(UserError, match='has not finished training, so it has no selection yet'):
    modes.run_eval(config, str(copy))
  assert modes.run_eval(config, str(copy), 'latest', member='0')['test_accuracy'] is not None
