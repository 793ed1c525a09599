"""launch.py as a user runs it: real subprocesses, one-line errors, non-zero exits."""
import json

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
