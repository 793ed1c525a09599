"""--mode=eval: a checkpoint evaluated again gives the numbers training wrote, bit for bit."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, small_config, workdir_snapshot
from digitjax import evaluate, metrics, train
from digitjax.errors import UserError


@pytest.fixture(scope='module')
def run(idx_dir, tfds_dir, tmp_path_factory):
  """One synthetic run of two epochs (checkpoints at steps 22 and 44), shared by the module."""
  config = small_config(idx_dir, tfds_dir, num_epochs=2)
  workdir = str(tmp_path_factory.mktemp('eval_run'))
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    return config, workdir, json.load(f)


def test_eval_reproduces_results_json_exactly(run, capsys):
  config, workdir, results = run
  result = evaluate.run_eval(config, workdir, str(results['checkpoint_step']), 'test')
  assert result['test_accuracy'] == results['test_accuracy']
  assert result['test_loss'] == results['test_loss']
  assert result['checkpoint_step'] == results['checkpoint_step'] == 44
  with open(os.path.join(workdir, 'eval.json')) as f:
    written = json.load(f)
  assert written == result
  per_class = written['test_per_class_accuracy']
  assert sorted(per_class) == [str(d) for d in range(10)]
  assert all(a is None or 0 <= a <= 1 for a in per_class.values())
  out = capsys.readouterr().out
  assert 'Checkpoint step 44 (44): test_accuracy' in out and 'Per-class accuracy: 0 ' in out


def test_other_splits_use_their_prefix_and_match_training(run):
  config, workdir, _ = run
  history = metrics.read_history(workdir)
  val = evaluate.run_eval(config, workdir, 'latest', 'validation')
  assert val['val_accuracy'] == history[-1]['val_accuracy']
  assert val['val_loss'] == history[-1]['val_loss']
  assert val['val_examples'] == 40 and 'test_accuracy' not in val
  first = evaluate.run_eval(config, workdir, '22', 'validation')
  assert first['val_accuracy'] == history[0]['val_accuracy']
  assert evaluate.run_eval(config, workdir, 'best', 'train')['train_examples'] == 360


def test_best_latest_and_step_choose_the_checkpoint(run):
  config, workdir, _ = run
  history = metrics.read_history(workdir)
  best_epoch = max(history, key=lambda r: (r['val_accuracy'], r['epoch']))['epoch']
  checkpoints = evaluate.open_checkpoints(workdir)
  try:
    assert evaluate.select_step(checkpoints, 'best') == 22 * best_epoch
    assert evaluate.select_step(checkpoints, 'latest') == 44
    assert evaluate.select_step(checkpoints, '22') == 22
    with pytest.raises(UserError, match=r'no checkpoint at that step .* steps \[22, 44\]'):
      evaluate.select_step(checkpoints, '23')
    with pytest.raises(UserError, match="--checkpoint='newest' is unknown"):
      evaluate.select_step(checkpoints, 'newest')
  finally:
    checkpoints.close()


def test_missing_checkpoints_and_other_configs_are_user_errors(run, tmp_path):
  config, workdir, _ = run
  with pytest.raises(UserError, match='no checkpoint in'):
    evaluate.run_eval(config, str(tmp_path / 'untrained'))
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(UserError, match='no checkpoint in'):
    evaluate.run_eval(config, str(tmp_path / 'empty'))
  wider = small_config(config.data.manual_dir, config.data.data_dir,
                       **{'model.dense_features': 128})
  with pytest.raises(UserError, match='model.dense_features=100 in the checkpoint but 128'):
    evaluate.run_eval(wider, workdir)


def test_eval_command_writes_eval_json_and_changes_nothing_else(run):
  config, workdir, results = run
  before = workdir_snapshot(workdir, skip=('eval.json',))
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'launch.py'), '--config=configs/default.py',
       f'--workdir={workdir}', '--mode=eval', '--checkpoint=latest',
       f'--config.data.manual_dir={config.data.manual_dir}',
       f'--config.data.data_dir={config.data.data_dir}', '--config.data.verify_checksums=False',
       '--config.batch_size=16', '--config.eval_batch_size=50'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f'test_accuracy {results["test_accuracy"]:.4f}' in proc.stdout
  with open(os.path.join(workdir, 'eval.json')) as f:
    written = json.load(f)
  assert written['test_accuracy'] == results['test_accuracy']
  assert written['checkpoint'] == 'latest' and written['checkpoint_step'] == 44
  assert workdir_snapshot(workdir, skip=('eval.json',)) == before
