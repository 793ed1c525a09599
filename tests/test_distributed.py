"""Data parallelism across processes: jax.distributed + gloo on 127.0.0.1, real launch.py runs.

One process per device is the multi-device layout tested here: several fake CPU devices in one
process deadlock in XLA's in-process all-reduce with jax 0.10.2 (README, "Running on many
devices and hosts").
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, small_config, write_dataset
from digitjax import checkpoint as ckpt_lib, train

TIMEOUT = 300


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def base_args(idx_dir, tfds_dir, workdir, *extra):
  return [sys.executable, str(ROOT / 'launch.py'), '--config=configs/default.py',
          f'--workdir={workdir}', f'--config.data.manual_dir={idx_dir}',
          f'--config.data.data_dir={tfds_dir}', '--config.data.verify_checksums=False',
          '--config.batch_size=16', '--config.eval_batch_size=100', '--config.plots=False',
          '--config.checkpoint_keep=10', '--config.learning_rate=0.002', *extra]


def launch(args, processes=1):
  """Runs launch.py as `processes` cooperating processes; returns their CompletedProcess-likes."""
  env = {**os.environ, 'XLA_FLAGS': ''}
  if processes == 1:
    return [subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                           env=env)]
  port = free_port()
  procs = [subprocess.Popen(
      args + ['--config.distributed.mode=on',
              f'--config.distributed.coordinator_address=127.0.0.1:{port}',
              f'--config.distributed.num_processes={processes}',
              f'--config.distributed.process_id={i}',
              '--config.distributed.initialization_timeout=60'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
      for i in range(processes)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=TIMEOUT)
      results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  finally:
    for p in procs:  # a failed or hung peer must not outlive the test
      if p.poll() is None:
        p.kill()
        p.wait()
  return results


def ok(results):
  for r in results:
    assert r.returncode == 0, r.stderr[-3000:]
  return results


def restored_params(idx_dir, tfds_dir, workdir, step):
  config = small_config(idx_dir, tfds_dir)  # same model; the optimizer state shapes match
  target = train.create_train_state(config, jax.random.key(0))
  state, _ = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True).restore(
      step, target)
  return state.params


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  # 2000 images -> 1800 for training -> 112 steps of 16 per epoch.
  return (write_dataset(tmp_path_factory.mktemp('dist_idx'), n_train=2000, n_test=200, seed=11),
          tmp_path_factory.mktemp('dist_tfds'))


@pytest.fixture(scope='module')
def one_process(data, tmp_path_factory):
  """The single-process reference: 5 epochs (560 steps), every epoch's checkpoint kept."""
  idx_dir, tfds_dir = data
  workdir = tmp_path_factory.mktemp('one')
  ok(launch(base_args(idx_dir, tfds_dir, workdir, '--config.num_epochs=5')))
  return workdir


def test_two_processes_train_like_one_for_560_steps(data, one_process, tmp_path):
  idx_dir, tfds_dir = data
  two = tmp_path / 'two'
  runs = ok(launch(base_args(idx_dir, tfds_dir, two, '--config.num_epochs=5'), processes=2))
  assert 'Epoch 5/5' in runs[0].stdout and 'Epoch' not in runs[1].stdout  # only process 0 talks
  assert not (two / 'results.json.tmp').exists()
  diff = max_diff(restored_params(idx_dir, tfds_dir, one_process, 560),
                  restored_params(idx_dir, tfds_dir, two, 560))
  print(f'max |params(1 process) - params(2 processes)| after 560 steps: {diff:.2e}')
  assert diff < 1e-4
  acc = [json.loads((w / 'results.json').read_text())['test_accuracy'] for w in (one_process, two)]
  assert round(acc[0], 3) == round(acc[1], 3)


def test_checkpoints_move_between_one_and_two_processes(data, one_process, tmp_path):
  idx_dir, tfds_dir = data
  a, b = tmp_path / 'a', tmp_path / 'b'
  host = '--config.input_pipeline=tfds'  # the per-step path, across processes too
  # 2 processes write epoch 1, one process finishes; and the other way round.
  ok(launch(base_args(idx_dir, tfds_dir, a, '--config.num_epochs=1', host), processes=2))
  ok(launch(base_args(idx_dir, tfds_dir, b, '--config.num_epochs=1', host)))
  resumed_a = ok(launch(base_args(idx_dir, tfds_dir, a, '--config.num_epochs=2', host)))
  resumed_b = ok(launch(base_args(idx_dir, tfds_dir, b, '--config.num_epochs=2', host),
                        processes=2))
  assert 'Resuming from checkpoint at step 112' in resumed_a[0].stdout
  assert 'Resuming from checkpoint at step 112' in resumed_b[0].stdout
  reference = restored_params(idx_dir, tfds_dir, one_process, 224)
  for workdir in (a, b):
    diff = max_diff(reference, restored_params(idx_dir, tfds_dir, workdir, 224))
    print(f'max |params(reference) - params({workdir.name})| after 224 steps: {diff:.2e}')
    assert diff < 1e-4


def test_batch_not_divisible_by_devices_is_a_clear_error(data, tmp_path):
  idx_dir, tfds_dir = data
  runs = launch(base_args(idx_dir, tfds_dir, tmp_path / 'w', '--config.batch_size=15'),
                processes=2)
  for r in runs:
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        'error: batch_size=15 is not divisible by the 2 devices; pick a multiple of 2')


def test_several_cpu_devices_in_one_process_are_refused_not_hung(data, tmp_path):
  idx_dir, tfds_dir = data
  proc = subprocess.run(base_args(idx_dir, tfds_dir, tmp_path / 'w'), cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT,
                        env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert proc.returncode == 2
  assert 'CPU devices in one process deadlock' in proc.stderr.strip().splitlines()[-1]
