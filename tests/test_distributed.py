"""Data parallelism across processes: jax.distributed + gloo on 127.0.0.1, real launch.py runs.

One process per device is the multi-device layout tested here: several fake CPU devices in one
process deadlock in XLA's in-process all-reduce with jax 0.10.2 (docs/distributed.md, "Running
on many devices and hosts").
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, small_config, write_dataset
from digitjax import checkpoint as ckpt_lib, inference, parallel

pytestmark = pytest.mark.slow
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


@pytest.fixture
def launch(processes):
  """Runs launch.py as `count` cooperating processes; returns their CompletedProcess-likes.
  Every one is killed and reaped when the test ends (the `processes` fixture)."""
  env = {**os.environ, 'XLA_FLAGS': ''}

  def run(args, count=1):
    if count == 1:
      return [processes.run(args, cwd=ROOT, env=env, timeout=TIMEOUT)]
    port = free_port()
    procs = [processes.popen(
        args + ['--config.distributed.mode=on',
                f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                f'--config.distributed.num_processes={count}',
                f'--config.distributed.process_id={i}',
                '--config.distributed.initialization_timeout=60'],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(count)]
    results = []
    for p in procs:
      out, err = p.communicate(timeout=TIMEOUT)
      results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results

  return run


def ok(results):
  for r in results:
    assert r.returncode == 0, r.stderr[-3000:]
  return results


def restored_params(idx_dir, tfds_dir, workdir, step):
  config = small_config(idx_dir, tfds_dir)  # same model; the optimizer state shapes match
  target = inference.abstract_state(config, parallel.make_mesh())
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True)
  state, _ = checkpoints.restore(step, target)
  checkpoints.close()
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
  proc = subprocess.run(base_args(idx_dir, tfds_dir, workdir, '--config.num_epochs=5'), cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT,
                        env={**os.environ, 'XLA_FLAGS': ''})
  ok([proc])
  return workdir


def test_two_processes_train_like_one_for_560_steps(data, one_process, tmp_path, launch):
  idx_dir, tfds_dir = data
  two = tmp_path / 'two'
  runs = ok(launch(base_args(idx_dir, tfds_dir, two, '--config.num_epochs=5'), count=2))
  assert 'Epoch 5/5' in runs[0].stdout and 'Epoch' not in runs[1].stdout  # only process 0 talks
  assert not (two / 'results.json.tmp').exists()
  diff = max_diff(restored_params(idx_dir, tfds_dir, one_process, 560),
                  restored_params(idx_dir, tfds_dir, two, 560))
  print(f'max |params(1 process) - params(2 processes)| after 560 steps: {diff:.2e}')
  # 1.8e-7 measured (docs/distributed.md): the same mathematics, the sum split in two
  assert diff < 1e-6
  acc = [json.loads((w / 'results.json').read_text())['test_accuracy'] for w in (one_process, two)]
  assert round(acc[0], 3) == round(acc[1], 3)


def test_checkpoints_move_between_one_and_two_processes(data, one_process, tmp_path, launch):
  idx_dir, tfds_dir = data
  a, b = tmp_path / 'a', tmp_path / 'b'
  host = '--config.input_pipeline=tfds'  # the per-step path, across processes too
  # 2 processes write epoch 1, one process finishes; and the other way round.
  ok(launch(base_args(idx_dir, tfds_dir, a, '--config.num_epochs=1', host), count=2))
  ok(launch(base_args(idx_dir, tfds_dir, b, '--config.num_epochs=1', host)))
  resumed_a = ok(launch(base_args(idx_dir, tfds_dir, a, '--config.num_epochs=2', host)))
  resumed_b = ok(launch(base_args(idx_dir, tfds_dir, b, '--config.num_epochs=2', host),
                        count=2))
  assert 'Resuming from checkpoint at step 112' in resumed_a[0].stdout
  assert 'Resuming from checkpoint at step 112' in resumed_b[0].stdout
  reference = restored_params(idx_dir, tfds_dir, one_process, 224)
  for workdir in (a, b):
    diff = max_diff(reference, restored_params(idx_dir, tfds_dir, workdir, 224))
    print(f'max |params(reference) - params({workdir.name})| after 224 steps: {diff:.2e}')
    assert diff < 1e-4


def test_batch_not_divisible_by_devices_is_a_clear_error(data, tmp_path, launch):
  idx_dir, tfds_dir = data
  runs = launch(base_args(idx_dir, tfds_dir, tmp_path / 'w', '--config.batch_size=15'), count=2)
  for r in runs:
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        'error: batch_size=15 is not divisible by the 2 devices; pick a multiple of 2')


def test_several_cpu_devices_in_one_process_are_refused_not_hung(data, tmp_path, processes):
  idx_dir, tfds_dir = data
  proc = processes.run(base_args(idx_dir, tfds_dir, tmp_path / 'w'), cwd=ROOT, timeout=TIMEOUT,
                       env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert proc.returncode == 2
  assert 'CPU devices in one process deadlock' in proc.stderr.strip().splitlines()[-1]


def test_a_population_dealt_out_to_two_processes_equals_one_process(data, tmp_path, launch):
  # Members 0 and 2 train on process 0, 1 and 3 on process 1, each on its own device with no
  # collective between them until the end: every member's figures are the 1-process run's.
  idx_dir, tfds_dir = data
  args = lambda w: base_args(idx_dir, tfds_dir, w, '--config.num_epochs=1',
                             '--config.data.max_train_examples=600',
                             '--config.sweep.grid=learning_rate=0.02,0.01; seed=0,1')
  ok(launch(args(tmp_path / "one")))
  two = ok(launch(args(tmp_path / 'two'), count=2))
  assert '4 members over 2 processes: each trains its own' in two[0].stdout
  assert 'Epoch' not in two[1].stdout  # process 0 speaks for all
  a, b = (json.loads((tmp_path / w / 'results.json').read_text()) for w in ('one', 'two'))
  assert a['selected'] == b['selected'] and a['test_loss'] == b['test_loss']
  for x, y in zip(a['members'], b['members']):
    assert (x['name'], x['test_loss'], x['val_loss'], x['checkpoint_step']) == (
        y['name'], y['test_loss'], y['val_loss'], y['checkpoint_step'])
    history = lambda w: [json.loads(l) for l in open(tmp_path / w / x['dir'] / 'metrics.jsonl')]
    assert [r.get('train_loss') for r in history('one')] == [
        r.get('train_loss') for r in history('two')]


def test_two_processes_on_a_fresh_data_dir_prepare_it_once(tmp_path, launch):
  # Process 0 prepares the dataset while process 1 waits at the barrier, then reads it.
  idx_dir = write_dataset(tmp_path / 'idx', n_train=400, n_test=100, seed=5)
  runs = ok(launch(base_args(idx_dir, tmp_path / 'fresh_tfds', tmp_path / 'w',
                             '--config.num_epochs=1'), count=2))
  prepared = [('Dataset mnist downloaded and prepared' in r.stdout + r.stderr) for r in runs]
  assert prepared == [True, False]


WRITING_CALLS = ('creat', 'mkdir', 'mkdirat', 'rename', 'renameat', 'renameat2', 'unlink',
                 'unlinkat', 'rmdir', 'truncate', 'symlink', 'symlinkat', 'link', 'linkat')


def writes_under(trace: str, folder: str) -> list[str]:
  """strace lines of calls that changed something under `folder`: opened to write, created,
  renamed, removed, linked (a call that failed changed nothing)."""
  found = []
  for line in trace.splitlines():
    call = line.split(None, 1)[-1].split('(', 1)[0]
    if f'"{folder}/' not in line or ' = -1 ' in line:
      continue
    if call in WRITING_CALLS or (call in ('open', 'openat', 'openat2') and any(
        flag in line for flag in ('O_WRONLY', 'O_RDWR', 'O_CREAT', 'O_TRUNC'))):
      found.append(line)
  return found


def test_only_process_0_writes_the_workdirs_files(data, tmp_path, processes):
  # docs/distributed.md: only process 0 writes metrics.jsonl, TensorBoard files, plots and
  # results.json; checkpoints are written by orbax the multi-host way, every process taking part.
  # Every file call of process 1 is traced (strace sees those of C++ libraries too: orbax's
  # tensorstore, TensorFlow's writers): its only writes are its own parts of a checkpoint.
  strace = shutil.which('strace')
  if strace is None:
    pytest.skip('strace is not installed: the calls of process 1 cannot be seen')
  idx_dir, tfds_dir = data
  workdir, trace = tmp_path / 'w', tmp_path / 'process1.strace'
  port = free_port()
  args = lambda i: base_args(
      idx_dir, tfds_dir, workdir, '--config.num_epochs=1', '--config.plots=True',
      '--config.data.max_train_examples=320', '--config.distributed.mode=on',
      f'--config.distributed.coordinator_address=127.0.0.1:{port}',
      '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
      '--config.distributed.initialization_timeout=60')
  env = {**os.environ, 'XLA_FLAGS': ''}
  traced = [strace, '-f', '-qq', '-e', 'trace=%file', '-o', str(trace)]
  procs = [processes.popen(prefix + args(i), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
           for i, prefix in enumerate(([], traced))]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=TIMEOUT)
    results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  ok(results)
  for name in ('results.json', 'metrics.jsonl', 'checkpoints', 'plots', 'tensorboard'):
    assert (workdir / name).exists(), name  # process 0 wrote the run
  text = trace.read_text()
  assert f'"{workdir}' in text  # process 1 was traced, and looked at the workdir
  writes = writes_under(text, str(workdir))
  assert writes, 'process 1 took no part in saving the checkpoints'
  assert [w for w in writes if f'"{workdir}/checkpoints/' not in w] == []
  assert [w for w in writes if 'process_1' not in w] == []  # orbax's files of process 1 only


def test_a_search_over_two_processes_decides_as_one_process(data, tmp_path, launch):
  # A search's slots train together, data parallel over both processes: each process scores
  # every slot on the whole validation split, so both rank the same scores and make the same
  # copies; process 0 writes the lineage. The decisions are one process's.
  idx_dir, tfds_dir = data
  args = lambda w: base_args(
      idx_dir, tfds_dir, w, '--config.num_epochs=1', '--config.data.max_train_examples=800',
      '--config.learning_rate=0.02', '--config.search.kind=pbt', '--config.search.size=4',
      '--config.search.space=learning_rate=loguniform(0.003,0.3);momentum=uniform(0.5,0.95)',
      '--config.search.ready_steps=10')
  ok(launch(args(tmp_path / 'one')))
  two = ok(launch(args(tmp_path / 'two'), count=2))
  assert 'Search step' in two[0].stdout and 'Search step' not in two[1].stdout
  lineage = lambda w: [json.loads(l) for l in open(tmp_path / w / 'lineage.jsonl')]
  one_events, two_events = lineage('one'), lineage('two')
  assert any(e['event'] == 'exploit' for e in one_events)
  decision = lambda e: (e['step'], e['event'], e['slot'], e.get('parent_slot'), e['trial'])
  assert [decision(e) for e in one_events] == [decision(e) for e in two_events]
  for x, y in zip(one_events, two_events):
    if x.get('score') is not None:
      assert abs(x['score'] - y['score']) < 1e-3
