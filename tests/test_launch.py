"""launch.py as a user runs it: real subprocesses, one-line errors, non-zero exits."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def run(*args, timeout=300):
  return subprocess.run([sys.executable, str(ROOT / 'launch.py'), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def small_args(idx_dir, tfds_dir, workdir):
  return ['--config=configs/default.py', f'--workdir={workdir}',
          f'--config.data.manual_dir={idx_dir}', f'--config.data.data_dir={tfds_dir}',
          '--config.data.verify_checksums=False', '--config.batch_size=16',
          '--config.num_epochs=1', '--config.eval_batch_size=50', '--config.plots=False']


def test_main_command_trains_and_writes_results(idx_dir, tfds_dir, tmp_path):
  proc = run(*small_args(idx_dir, tfds_dir, tmp_path / 'run'))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'Epoch 1/1' in proc.stdout and 'Test: loss' in proc.stdout
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert results['config']['batch_size'] == 16  # the override reached the run


def test_unknown_config_key_fails_before_any_work(idx_dir, tfds_dir, tmp_path):
  proc = run(*small_args(idx_dir, tfds_dir, tmp_path / 'run'), '--config.bacth_size=8')
  assert proc.returncode != 0
  assert 'bacth_size' in proc.stderr
  assert not (tmp_path / 'run').exists()


def test_invalid_value_names_the_field(idx_dir, tfds_dir, tmp_path):
  proc = run(*small_args(idx_dir, tfds_dir, tmp_path / 'run'), '--config.batch_size=0')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: config.batch_size=0 is invalid: it must be a positive integer')


def test_missing_data_dir_is_one_clear_line(tfds_dir, tmp_path):
  args = small_args(tmp_path / 'nowhere', tmp_path / 'tfds', tmp_path / 'run')
  proc = run(*args)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: data.manual_dir=') and 'no such directory' in last
  assert 'Traceback' not in proc.stderr


def test_fast_config_loads_and_is_checked(idx_dir, tfds_dir, tmp_path):
  args = small_args(idx_dir, tfds_dir, tmp_path / 'run')
  args[0] = '--config=configs/fast.py'
  proc = run(*args, '--config.learning_rate=-1')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: config.learning_rate=-1.0 is invalid: it must be positive')
