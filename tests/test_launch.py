"""launch.py as a user runs it: real subprocesses, one-line errors, non-zero exits."""
import json
import re

import pytest

from conftest import ROOT, launch_args

pytestmark = pytest.mark.slow


def small_args(idx_dir, tfds_dir, workdir):
  return ['--config=configs/default.py', f'--workdir={workdir}',
          f'--config.data.manual_dir={idx_dir}', f'--config.data.data_dir={tfds_dir}',
          '--config.data.verify_checksums=False', '--config.batch_size=16',
          '--config.num_epochs=1', '--config.eval_batch_size=50', '--config.plots=False']


def test_main_command_trains_and_writes_results(idx_dir, tfds_dir, tmp_path, processes):
  proc = processes.run(launch_args(*small_args(idx_dir, tfds_dir, tmp_path / 'run')), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'Epoch 1/1' in proc.stdout and 'Test: loss' in proc.stdout
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  # The batch-size override took effect: 360 examples in batches of 16 are 22 steps (the
  # default 32 would give 11).
  assert results['checkpoint_step'] == 22


def test_a_population_from_the_command_line(idx_dir, tfds_dir, tmp_path, processes):
  proc = processes.run(launch_args(*small_args(idx_dir, tfds_dir, tmp_path / 'run'),
                                   "--config.sweep.grid=learning_rate=0.02,0.01",
                                   "--config.sweep.members=('', 'nesterov=True')"), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert [m['name'] for m in results['members']] == [
      'learning_rate=0.02', 'learning_rate=0.01', 'nesterov=True,learning_rate=0.02',
      'nesterov=True,learning_rate=0.01']
  assert 'member                ' in proc.stdout  # the table


def test_unknown_config_key_fails_before_any_work(idx_dir, tfds_dir, tmp_path, processes):
  proc = processes.run(launch_args(*small_args(idx_dir, tfds_dir, tmp_path / 'run'),
                                   '--config.bacth_size=8'), cwd=ROOT)
  assert proc.returncode != 0
  assert 'bacth_size' in proc.stderr
  assert not (tmp_path / 'run').exists()


def test_invalid_values_name_the_field_and_create_nothing(idx_dir, tfds_dir, tmp_path,
                                                         processes):
  for override, message in (('batch_size=0', 'config.batch_size=0 is invalid: it must be a '
                                              'positive integer'),
                            ('sweep.grid=seed=0,x', "config.sweep member 1 (seed=x): "
                                                    "config.seed='x' has the wrong type")):
    proc = processes.run(launch_args(*small_args(idx_dir, tfds_dir, tmp_path / 'run'),
                                     f'--config.{override}'), cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f'error: {message}')
    assert not (tmp_path / 'run').exists()


def test_missing_data_dir_is_one_clear_line(tmp_path, processes):
  args = small_args(tmp_path / 'nowhere', tmp_path / 'tfds', tmp_path / 'run')
  proc = processes.run(launch_args(*args), cwd=ROOT)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: data.manual_dir=') and 'no such directory' in last
  assert 'Traceback' not in proc.stderr


def test_fast_config_loads_and_is_checked(idx_dir, tfds_dir, tmp_path, processes):
  args = small_args(idx_dir, tfds_dir, tmp_path / 'run')
  args[0] = '--config=configs/fast.py'
  proc = processes.run(launch_args(*args, '--config.learning_rate=-1'), cwd=ROOT)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: config.learning_rate=-1.0 is invalid: it must be 0 (a frozen member, for '
      'comparisons) or positive')


def test_a_fresh_run_prints_no_other_librarys_start_up_notices(idx_dir, tmp_path, processes):
  # A fresh data dir: tfds prepares it (and imports TensorFlow to do so).
  args = small_args(idx_dir, tmp_path / 'fresh_tfds', tmp_path / 'run')
  proc = processes.run(launch_args(*args), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  head = (proc.stderr + proc.stdout).splitlines()[:20]
  noise = ('oneDNN', 'absl::InitializeLog', 'Variant folder', 'OpenCV', 'cuda', 'cpu_feature',
           'I0000', 'W0000', 'E0000')
  assert not [l for l in head if any(n in l for n in noise)], head
  assert 'mnist: 360 train' in proc.stdout  # digitjax's own lines are there
  loud = processes.run(launch_args(*args, '-v', '0'), cwd=ROOT)  # -v brings them back
  assert 'Already trained' in loud.stdout
  assert re.search(r'^I\d{4} ', loud.stderr, re.M)  # absl's INFO lines are back


def test_the_modes_need_only_the_workdir(idx_dir, tfds_dir, tmp_path, processes):
  import numpy as np
  workdir = tmp_path / 'run'
  trained = processes.run(launch_args(*small_args(idx_dir, tfds_dir, workdir)), cwd=ROOT)
  assert trained.returncode == 0, trained.stderr[-2000:]
  results = json.loads((workdir / 'results.json').read_text())
  evaluated = processes.run(launch_args(f'--workdir={workdir}', '--mode=eval',
                                        '--checkpoint=latest'), cwd=ROOT)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert json.loads((workdir / 'eval.json').read_text())['test_loss'] == results['test_loss']
  np.save(tmp_path / 'digits.npy', np.eye(28, dtype=np.uint8)[None] * 255)
  predicted = processes.run(launch_args(f'--workdir={workdir}', '--mode=predict',
                                        f'--inputs={tmp_path / "digits.npy"}'), cwd=ROOT)
  assert predicted.returncode == 0 and predicted.stdout.startswith('path,prediction')
  # Overrides still apply on top, and one that does not fit the checkpoint is one line.
  wider = processes.run(launch_args(f'--workdir={workdir}', '--mode=eval',
                                    '--config.model.dense_features=50'), cwd=ROOT)
  assert wider.returncode == 2
  assert 'model.dense_features=100 in the checkpoint but 50' in wider.stderr.splitlines()[-1]
  nothing = processes.run(launch_args(f'--workdir={tmp_path / "none"}', '--mode=eval'), cwd=ROOT)
  assert nothing.returncode == 2 and nothing.stderr.splitlines()[-1].startswith(
      f'error: --workdir={tmp_path / "none"} holds no trained run')


def test_tensorboard_gets_the_training_curve_between_epochs(idx_dir, tfds_dir, tmp_path,
                                                            processes):
  workdir = tmp_path / 'run'
  proc = processes.run(launch_args(*small_args(idx_dir, tfds_dir, workdir),
                                   '--config.num_epochs=2', '--config.log_every_steps=5',
                                   '--config.chunk_steps=5'), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  from tensorflow.compat.v1.train import summary_iterator
  scalars = {}
  for path in (workdir / 'tensorboard').iterdir():
    for event in summary_iterator(str(path)):
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(event.step)
  # 22 steps per epoch in chunks of 5: logged at 5, 10, 15, 20, 22 (epoch end), 27, ...
  assert scalars['train/loss'] == [5, 10, 15, 20, 22, 27, 32, 37, 42, 44]
  assert scalars['train/learning_rate'] == scalars['train/loss']
  assert scalars['val_accuracy'] == [22, 44]  # per epoch
