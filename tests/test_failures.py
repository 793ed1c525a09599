"""Every failure a user can cause ends in one clear line and loses nothing (issue 19): outputs
that would overwrite inputs, torn and damaged run files, signals in every phase, concurrent data
preparation, read-only workdirs, odd values and odd inputs. Item numbers are the issue's."""
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import digitjax
from conftest import (ROOT, cannot_mount, launch_args, small_config, wait_for, write_dataset,
                      workdir_snapshot)
from digitjax import images, metrics, modes, signals
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError


@pytest.fixture(scope='module')
def trained(idx_dir, tfds_dir, tmp_path_factory):
  """A finished 3-epoch run (checkpoints at 22, 44, 66)."""
  config = small_config(idx_dir, tfds_dir, num_epochs=3)
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  return config, workdir, digitjax.train(config, str(workdir))


@pytest.fixture
def copy(trained, tmp_path):
  config, workdir, results = trained
  shutil.copytree(workdir, tmp_path / 'copy')
  return config, tmp_path / 'copy', results


def _epochs(workdir):
  return [r['epoch'] for r in workdir_lib.read_jsonl(str(workdir / 'metrics.jsonl'))
          if 'epoch' in r]


def _one_error_line(proc, status=2):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == status, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert lines and lines[-1].startswith('error: '), proc.stderr[-2000:]
  return lines[-1]


# ---------------------------------------------------------------------------------------------
# 1. Outputs never overwrite inputs or a workdir's own files


def test_predict_output_that_is_an_input_or_in_the_workdir_is_refused(copy, tmp_path):
  config, workdir, _ = copy
  folder = tmp_path / 'pictures'
  folder.mkdir()
  Image.fromarray(np.eye(28, dtype=np.uint8) * 255).save(folder / 'photo.jpg')
  photo = (folder / 'photo.jpg').read_bytes()
  results = (workdir / 'results.json').read_bytes()
  for output, message in ((folder / 'photo.jpg', 'is one of the --inputs'),
                          (workdir / 'results.json', 'is inside --workdir'),
                          (workdir / 'new.csv', 'is inside --workdir'),
                          (folder, 'is a folder')):
    with pytest.raises(UserError, match=message):
      modes.run_predict(config, str(workdir), [str(folder)], str(output))
  assert (folder / 'photo.jpg').read_bytes() == photo
  assert (workdir / 'results.json').read_bytes() == results
  assert not (workdir / 'new.csv').exists()
  # Elsewhere it is written, and it replaces an older file whole.
  (tmp_path / 'out.csv').write_text('old')
  assert modes.run_predict(config, str(workdir), [str(folder)], str(tmp_path / 'out.csv')) == 0
  assert (tmp_path / 'out.csv').read_text().startswith('path,prediction,confidence\n')


def test_predict_output_through_a_link_or_into_a_pipe_keeps_the_link_and_the_pipe(copy,
                                                                                  tmp_path):
  # A link to a file: the file it points at gets the predictions, the link stays a link.
  config, workdir, _ = copy
  digit = tmp_path / 'digit.npy'
  np.save(digit, np.pad(np.eye(20, dtype=np.uint8) * 255, 4)[None])
  (tmp_path / 'kept.csv').write_text('old')
  (tmp_path / 'link.csv').symlink_to(tmp_path / 'kept.csv')
  assert modes.run_predict(config, str(workdir), [str(digit)], str(tmp_path / 'link.csv')) == 0
  assert os.readlink(tmp_path / 'link.csv') == str(tmp_path / 'kept.csv')
  expected = (tmp_path / 'kept.csv').read_text()
  assert expected.startswith('path,prediction,confidence\n') and len(expected.splitlines()) == 2
  # A pipe (as /dev/stdout may be): written to, not replaced by a file. Its reader is open
  # first, so the write does not wait (the CSV fits the pipe's buffer).
  fifo = tmp_path / 'pipe'
  os.mkfifo(fifo)
  reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
  try:
    assert modes.run_predict(config, str(workdir), [str(digit)], str(fifo)) == 0
    received = os.read(reader, 1 << 16).decode()
  finally:
    os.close(reader)
  assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
  assert received == expected


# ---------------------------------------------------------------------------------------------
# 2, 10. Torn and repeated records


def test_a_torn_last_line_is_repaired_and_no_record_is_written_twice(copy, idx_dir, tfds_dir,
                                                                     caplog):
  config, workdir, _ = copy
  metrics = workdir / 'metrics.jsonl'
  os.truncate(metrics, 150)  # what a kill or a power cut in mid-write leaves
  results = digitjax.train(small_config(idx_dir, tfds_dir, num_epochs=4), str(workdir))
  assert results['checkpoint_step'] == 88
  assert 'removed 1 damaged line(s)' in caplog.text
  records = [json.loads(line) for line in metrics.read_text().splitlines()]  # all whole
  assert _epochs(workdir) == [4] or _epochs(workdir) == [1, 4]  # the torn record is gone
  assert len([r for r in records if 'test_loss' in r]) == 1  # the old test record replaced
  assert json.loads((workdir / 'results.json').read_text()) == results


def test_lost_checkpoints_start_over_loudly_and_records_are_not_doubled(copy, idx_dir, tfds_dir,
                                                                         caplog):
  config, workdir, _ = copy
  shutil.rmtree(workdir / 'checkpoints')
  digitjax.train(config, str(workdir))
  assert 'holds the metrics of an earlier run but no checkpoint' in caplog.text
  assert _epochs(workdir) == [1, 2, 3]


def test_a_resume_from_an_earlier_step_drops_the_later_records(copy):
  config, workdir, _ = copy
  for step in ('66', '44'):  # as if the last two saves had failed
    shutil.rmtree(workdir / 'checkpoints' / step)
  (workdir / 'results.json').unlink()
  digitjax.train(config, str(workdir))
  assert _epochs(workdir) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# 4. Damaged results.json


@pytest.mark.parametrize('content', ['garbage{', '', '[]', '{"checkpoint_step": 66}'])
def test_a_damaged_results_file_is_written_again(copy, content, caplog):
  config, workdir, results = copy
  (workdir / 'results.json').write_text(content)
  again = digitjax.train(config, str(workdir))
  assert (again['test_loss'], again['checkpoint_step']) == (results['test_loss'], 66)
  assert json.loads((workdir / 'results.json').read_text())['test_loss'] == results['test_loss']
  assert 'Ignoring the damaged results file' in caplog.text
  assert _epochs(workdir) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# 5. Concurrent preparation of one data dir


@pytest.mark.slow
def test_a_run_waits_for_another_preparing_the_same_data_dir(tmp_path, processes):
  idx = write_dataset(tmp_path / 'idx', n_train=200, n_test=50, seed=9)
  data_dir = tmp_path / 'tfds'
  data_dir.mkdir()
  # This test holds the lock, as a run preparing the data would.
  fd = os.open(data_dir / '.digitjax-preparing-mnist.lock', os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX)
  err = tmp_path / 'err'
  args = launch_args('--config=configs/default.py', f'--workdir={tmp_path / "w"}',
                     f'--config.data.manual_dir={idx}', f'--config.data.data_dir={data_dir}',
                     '--config.data.verify_checksums=False', '--config.num_epochs=1',
                     '--config.batch_size=16', '--config.eval_batch_size=50',
                     '--config.plots=False')
  proc = processes.popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(err, 'w'))
  wait_for(proc, err.read_text, 'Another run is preparing mnist')
  assert not (data_dir / 'mnist').exists()  # it waits; it writes nothing meanwhile
  os.close(fd)  # released: the waiting run prepares it (it was not prepared) and trains
  assert proc.wait(timeout=300) == 0, err.read_text()[-2000:]


@pytest.mark.slow
def test_two_runs_preparing_one_fresh_data_dir_both_succeed(tmp_path, processes):
  idx = write_dataset(tmp_path / 'idx', n_train=200, n_test=50, seed=9)
  args = lambda w: launch_args(
      '--config=configs/default.py', f'--workdir={tmp_path / w}', f'--config.data.manual_dir={idx}',
      f'--config.data.data_dir={tmp_path / "tfds"}', '--config.data.verify_checksums=False',
      '--config.num_epochs=1', '--config.batch_size=16', '--config.eval_batch_size=50',
      '--config.plots=False')
  runs = [processes.popen(args(w), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) for w in ('a', 'b')]
  for run in runs:
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert 'Traceback' not in err


# ---------------------------------------------------------------------------------------------
# 6. Read-only workdirs


@pytest.mark.slow
def test_eval_and_report_on_a_read_only_workdir_end_in_one_line(copy, tmp_path, processes):
  config, workdir, results = copy
  ro = tmp_path / 'ro'
  ro.mkdir()
  bind = subprocess.run(['mount', '--bind', str(workdir), str(ro)], capture_output=True,
                        text=True)
  if bind.returncode:
    cannot_mount(bind.stderr.strip())
  try:
    subprocess.run(['mount', '-o', 'remount,ro,bind', str(ro)], check=True)
    before = workdir_snapshot(ro)
    for mode in ('eval', 'report'):
      proc = processes.run(launch_args(
          '--config=configs/default.py', f'--workdir={ro}', f'--mode={mode}',
          f'--config.data.manual_dir={config.data.manual_dir}',
          f'--config.data.data_dir={config.data.data_dir}',
          '--config.data.verify_checksums=False', '--config.batch_size=16',
          '--config.eval_batch_size=50'), cwd=ROOT)
      line = _one_error_line(proc)
      assert 'Read-only file system' in line and str(ro) in line, line
    assert workdir_snapshot(ro) == before
  finally:
    subprocess.run(['umount', str(ro)], check=True)


# ---------------------------------------------------------------------------------------------
# 7, 12. Odd values


def test_a_huge_eval_batch_is_not_padded_to(copy):
  # eval_batch_size=1,000,000 used to pad every split to a million images (4.5 GB).
  config, workdir, results = copy
  config.eval_batch_size = 1_000_000
  result = modes.run_eval(config, str(workdir), 'latest', 'test')
  assert result['test_accuracy'] == pytest.approx(results['test_accuracy'], abs=0.02)


# ---------------------------------------------------------------------------------------------
# 8, 14. Flags and config files


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--config=configs/nope.py'], 'error: --config: configs/nope.py: no such file'),
    (['--config=BAD'], 'error: --config: the config file does not load (SyntaxError'),
    (['--config=configs/default.py', '--config.learnig_rate=0.1'],
     "error: config.learnig_rate is not a config field; did you mean 'learning_rate'?"),
    (['--config=configs/default.py', '--config.ensemble_size=3'],
     'error: config.ensemble_size was removed: seed ensembles are populations now'),
    (['--config=configs/default.py', '--mode=eval', '--inputs=a.png'],
     'error: --inputs applies to --mode=predict only'),
    (['--config=configs/default.py', '--mode=eval', '--checkpoint='],
     "error: --checkpoint is empty: give 'best', 'latest' or a step number"),
    (['--config=configs/default.py', '--config.num_epochs=inf'],
     'error: config.num_epochs=inf is invalid'),
    (['--config=configs/default.py', '--workdir='], 'error: --workdir is empty'),
])
def test_flag_and_config_file_mistakes_are_one_line(tmp_path, processes, args, message):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n')
  args = [str(bad) if a == '--config=BAD' else a for a in args]
  args = [f'--config={bad}' if a == str(bad) else a for a in args]
  if not any(a.startswith('--workdir=') for a in args):
    args.append(f'--workdir={tmp_path / "w"}')
  proc = processes.run(launch_args(*args), cwd=ROOT, timeout=120)
  assert proc.stderr.strip().splitlines() and len([
      l for l in proc.stderr.splitlines() if l.startswith('error:')]) == 1
  assert _one_error_line(proc).startswith(message)
  assert 'usage' not in proc.stderr.lower()
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_an_input_path_with_a_comma_is_taken_whole(copy, tmp_path, processes):
  config, workdir, _ = copy
  path = tmp_path / 'one, two.npy'
  np.save(path, np.eye(28, dtype=np.uint8)[None] * 255)
  proc = processes.run(launch_args(
      '--config=configs/default.py', f'--workdir={workdir}', '--mode=predict',
      f'--inputs={path}', '--config.eval_batch_size=50'), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines()[1].startswith(f'"{path}[0]",')  # quoted: it holds a comma


def test_an_error_after_the_workdir_is_claimed_leaves_no_empty_folder(tmp_path):
  config = small_config(tmp_path / 'nowhere', tmp_path / 'tfds')
  with pytest.raises(UserError, match='no such directory'):
    digitjax.train(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


# ---------------------------------------------------------------------------------------------
# 13. Odd inputs for predict


def test_blank_arrays_symlink_loops_and_negative_floats_get_their_own_reasons(tmp_path):
  blank = np.zeros((3, 28, 28), np.uint8)
  blank[1, 10:18, 12:16] = 255
  np.save(tmp_path / 'rows.npy', blank)
  np.save(tmp_path / 'negative.npy', -np.ones((28, 28), np.float32))
  os.symlink(tmp_path / 'loop_b', tmp_path / 'loop_a')
  os.symlink(tmp_path / 'loop_a', tmp_path / 'loop_b')
  os.symlink(tmp_path / 'gone.png', tmp_path / 'dangling.png')
  read = images.read_inputs([str(tmp_path / n) for n in ('rows.npy', 'negative.npy', 'loop_a',
                                                         'dangling.png')])
  assert read.names == [f'{tmp_path / "rows.npy"}[1]']
  assert dict(read.errors) == {
      f'{tmp_path / "rows.npy"}[0]': 'blank image: no digit found',
      f'{tmp_path / "rows.npy"}[2]': 'blank image: no digit found',
      str(tmp_path / 'negative.npy'): 'array values span -1..-1; expected 0..255 or 0..1',
      str(tmp_path / 'loop_a'): 'a loop of symbolic links',
      str(tmp_path / 'dangling.png'): f'a symbolic link to {tmp_path / "gone.png"}, which does '
                                      f'not exist'}


def test_an_endless_or_oversized_input_is_refused_before_it_fills_the_memory(tmp_path,
                                                                             monkeypatch):
  # /dev/zero never ends: read whole, it took every byte of memory until the kernel killed
  # the run. Reading stops past images.MAX_BYTES (2 GiB; 1 MiB here) with a reason.
  monkeypatch.setattr(images, 'MAX_BYTES', 1 << 20)
  np.save(tmp_path / 'big.npy', np.zeros((1400, 28, 28), np.uint8))  # 1.05 MiB
  np.save(tmp_path / 'fits.npy', np.pad(np.eye(20, dtype=np.uint8) * 255, 4))
  inputs = [str(tmp_path / 'big.npy'), str(tmp_path / 'fits.npy')]
  if os.path.exists('/dev/zero'):
    inputs.append('/dev/zero')
  read = images.read_inputs(inputs)
  assert read.names == [str(tmp_path / 'fits.npy')]
  assert dict(read.errors) == {path: 'larger than 1 MiB; split it or scale it down'
                               for path in inputs if 'fits' not in path}


@pytest.mark.slow
def test_a_large_picture_is_read_and_a_giant_one_is_refused_in_one_line(tmp_path):
  big = Image.new('L', (10_000, 10_000), 255)  # 100 megapixels: past Pillow's own 89M limit
  big.paste(0, (4000, 3000, 5000, 7000))
  big.save(tmp_path / 'big.png')
  digit = images.to_mnist(images.read_image(str(tmp_path / 'big.png')))
  assert digit.shape == (28, 28) and digit.max() == 255
  Image.new('L', (16_000, 16_000), 0).save(tmp_path / 'giant.png')
  read = images.read_inputs([str(tmp_path / 'giant.png')])
  assert read.errors == [(str(tmp_path / 'giant.png'),
                          'a picture of more than 250 megapixels; scale it down first')]


# ---------------------------------------------------------------------------------------------
# 3, 9, 14. Signals in every phase


def test_a_signal_while_other_libraries_notices_are_hidden_is_still_acknowledged(capfd,
                                                                                monkeypatch):
  # TensorFlow loads (data preparation, export) with fd 2 on /dev/null; a Ctrl-C meanwhile
  # still says at once that the run is stopping. sys.stderr writes to fd 2, as in launch.py.
  monkeypatch.setattr(sys, 'stderr', open(2, 'w', closefd=False))
  from absl import logging as absl_logging
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    with signals.recorded():
      with metrics.quiet_native_stderr():
        os.write(2, b'a native start-up notice\n')
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0)  # the handler runs in this thread, here
      assert signals.received() == 'SIGINT'
      with pytest.raises(signals.Interrupted, match='stopped by SIGINT while testing'):
        signals.check('while testing')
  finally:
    absl_logging.set_verbosity(verbosity)
  err = capfd.readouterr().err
  assert 'a native start-up notice' not in err
  assert err.splitlines() == ['SIGINT received: stopping at the next safe point']
  assert signals.received() is None  # recorded() put the previous handlers back


def _catches_sigterm(pid: int) -> bool:
  """Whether the process has a handler for SIGTERM (Python has none of its own: launch.py's
  first statement installs it, just before the heavy imports)."""
  try:
    with open(f'/proc/{pid}/status') as f:
      caught = next(int(line.split()[1], 16) for line in f if line.startswith('SigCgt:'))
  except FileNotFoundError:  # it has already ended
    return False
  return bool(caught & (1 << (signal.SIGTERM - 1)))


def _run_until(processes, args, tmp_path, name, when, repeat=False):
  """Starts `args`, sends a signal once `when(stdout, stderr, pid)` names one (again and again
  until the process ends, with `repeat`), returns (status, stdout, stderr, signal sent)."""
  out, err = tmp_path / f'{name}.out', tmp_path / f'{name}.err'
  proc = processes.popen(args, cwd=ROOT, stdout=open(out, 'w'), stderr=open(err, 'w'))
  sent = None
  while proc.poll() is None:
    sig = None if sent and not repeat else when(out.read_text(), err.read_text(), proc.pid)
    if sig:
      try:
        proc.send_signal(sig)
      except ProcessLookupError:
        pass
      sent = sig
    time.sleep(0.01)
  return proc.wait(), out.read_text(), err.read_text(), sent


def _paused(sig):
  """Sends `sig` once the run says it is paused (--debug_pause_at)."""
  return lambda out, err, pid: sig if 'digitjax: paused at' in err else None


def _clean_stop(status, stdout, stderr, sig, note):
  """The run stopped on `sig` (never died of it: status 130/143, not -2/-15), with no
  traceback, its last line on stderr saying so."""
  assert status == 128 + sig, (status, note, stderr[-3000:])
  assert 'Traceback' not in stderr and 'Fatal Python error' not in stderr, (note, stderr[-3000:])
  assert 'Exception ignored' not in stderr, (note, stderr[-3000:])
  last = stderr.strip().splitlines()[-1]
  assert last.startswith(f'stopped by {sig.name}') or (
      f'Stopped by {sig.name}' in stdout and 'checkpoint saved' in stdout), (note, last)


@pytest.mark.slow
def test_sigint_during_imports_compilation_and_data_preparation_stops_cleanly(
    idx_dir, tfds_dir, tmp_path, processes):
  args = lambda w, *more: launch_args(
      '--config=configs/default.py', f'--workdir={tmp_path / w}',
      f'--config.data.manual_dir={idx_dir}', f'--config.data.data_dir={tfds_dir}',
      '--config.data.verify_checksums=False', '--config.batch_size=16', '--config.plots=False',
      '--config.compilation_cache_dir=',
      '--config.model.dense_features=77', *more)  # a width no cache holds: a slow compile
  # 9. While Python imports (as soon as launch.py records signals, before jax, TensorFlow and
  # the rest load): the run stops, it never trains to the end.
  status, out, err, sent = _run_until(
      processes, args('early'), tmp_path, 'early',
      lambda o, e, pid: signal.SIGINT if _catches_sigterm(pid) else None)
  _clean_stop(status, out, err, signal.SIGINT, 'early')
  assert 'Epoch' not in out and not (tmp_path / 'early' / 'results.json').exists()
  assert err.strip().splitlines()[-1].startswith('stopped by SIGINT while starting; nothing was '
                                                 'written'), err[-2000:]
  # 3. While the train step compiles: no segfault (139), the stop comes once it has compiled.
  status, out, err, sent = _run_until(processes, args('compiling', '--debug_pause_at=compiling'),
                                      tmp_path, 'compiling', _paused(signal.SIGINT))
  _clean_stop(status, out, err, signal.SIGINT, 'compiling')
  assert 'stopped by SIGINT while compiling the train step' in err.strip().splitlines()[-1]
  assert 'Epoch 1/1' not in out
  # 14. While tfds prepares a fresh data dir: it finishes what it writes, then one line.
  idx = write_dataset(tmp_path / 'big_idx', n_train=2000, n_test=100, seed=4)
  fresh = launch_args('--config=configs/default.py', f'--workdir={tmp_path / "prep"}',
                      f'--config.data.manual_dir={idx}',
                      f'--config.data.data_dir={tmp_path / "fresh_tfds"}',
                      '--config.data.verify_checksums=False', '--config.num_epochs=0.05',
                      '--config.plots=False')
  status, out, err, sent = _run_until(processes, [*fresh, '--debug_pause_at=preparing'],
                                      tmp_path, 'preparing', _paused(signal.SIGINT))
  _clean_stop(status, out, err, signal.SIGINT, 'preparing')
  assert err.strip().splitlines()[-1] == ('stopped by SIGINT while preparing the data; what was '
                                          'prepared is complete; run the same command to start '
                                          'again')
  again = processes.run(fresh, cwd=ROOT)
  assert again.returncode == 0 and 'Downloading and preparing' not in again.stdout, again.stderr


# Each phase a run goes through (signals.PHASES), held there by --debug_pause_at and stopped by
# a signal: every stop is clean, and the same command then ends as a run never stopped.
PHASE_STOPS = [('starting', signal.SIGTERM), ('compiling', signal.SIGINT),
               ('step:30', signal.SIGTERM), ('evaluating', signal.SIGINT),
               ('saving', signal.SIGTERM)]


@pytest.mark.slow
def test_a_signal_at_every_phase_then_the_same_command_equals_a_clean_run(
    idx_dir, tfds_dir, tmp_path, processes):
  args = lambda w, *more: launch_args(
      '--config=configs/default.py', f'--workdir={tmp_path / w}',
      f'--config.data.manual_dir={idx_dir}', f'--config.data.data_dir={tfds_dir}',
      '--config.data.verify_checksums=False', '--config.batch_size=16',
      '--config.num_epochs=3', '--config.eval_batch_size=50', '--config.chunk_steps=5',
      '--config.plots=True', '--config.augment.enabled=True', *more)
  clean = processes.run(args('clean'), cwd=ROOT)
  assert clean.returncode == 0, clean.stderr[-2000:]
  for i, (phase, sig) in enumerate(PHASE_STOPS):
    note = f'{sig.name} at {phase}'
    status, out, err, sent = _run_until(processes, args('hit', f'--debug_pause_at={phase}'),
                                        tmp_path, f'hit{i}', _paused(sig))
    assert sent == sig, (note, err[-2000:])  # the run reached the phase and was stopped there
    _clean_stop(status, out, err, sig, note)
  # Once training is over, a signal lets the run finish its results and pictures, which it
  # says: at the test split's evaluation, then at the pictures, exit 0.
  status, out, err, sent = _run_until(
      processes, args('hit', '--debug_pause_at=testing,plotting'), tmp_path, 'finishing',
      lambda o, e, pid: signal.SIGINT if e.count('digitjax: paused at') > len(
          [x for x in e.splitlines() if x.startswith('SIGINT received')]) else None,
      repeat=True)
  assert status == 0 and 'paused at plotting' in err, (status, err[-3000:])
  assert err.strip().splitlines()[-1] == (
      'SIGINT came while the run was finishing; its results are complete'), err[-2000:]
  final = processes.run(args('hit'), cwd=ROOT)
  assert final.returncode == 0 and 'Already trained' in final.stdout, final.stderr[-2000:]
  a, b = (json.loads((tmp_path / w / 'results.json').read_text()) for w in ('clean', 'hit'))
  assert (a['test_loss'], a['val_loss'], a['checkpoint_step']) == (
      b['test_loss'], b['val_loss'], b['checkpoint_step'])
  assert _epochs(tmp_path / 'hit') == [1, 2, 3]
  assert sorted(os.listdir(tmp_path / 'hit' / 'plots')) == sorted(
      os.listdir(tmp_path / 'clean' / 'plots'))


@pytest.mark.slow
def test_signals_after_the_results_are_complete_end_in_the_normal_exit(idx_dir, tfds_dir,
                                                                       tmp_path, processes):
  # The last phase: the results are written, the interpreter and JAX's threads shut down. A
  # signal then, and every signal until the process is gone, leaves the results as they are and
  # the exit status 0 (one came in the interpreter's shutdown and killed it: status -15).
  args = launch_args(
      '--config=configs/default.py', f'--workdir={tmp_path / "run"}',
      f'--config.data.manual_dir={idx_dir}', f'--config.data.data_dir={tfds_dir}',
      '--config.data.verify_checksums=False', '--config.batch_size=16',
      '--config.num_epochs=0.2', '--config.plots=False', '--debug_pause_at=exiting')
  signals_ = itertools.cycle([signal.SIGTERM, signal.SIGINT])
  status, out, err, sent = _run_until(
      processes, args, tmp_path, 'exiting',
      lambda o, e, pid: next(signals_) if 'digitjax: paused at exiting' in e else None,
      repeat=True)
  assert sent and status == 0, (status, err[-3000:])
  assert 'Traceback' not in err and 'Exception ignored' not in err, err[-3000:]
  # The signals come every 10 ms, SIGTERM first; on a busy machine both are pending before
  # Python runs a handler, and it runs them in signal-number order (SIGINT first). The last
  # line names the signal the run received first, whichever that was.
  first = re.search(r'(SIGTERM|SIGINT) received: stopping', err)
  assert first, err[-2000:]
  assert err.strip().splitlines()[-1] == (f'{first.group(1)} came while the run was finishing; '
                                          'its results are complete'), err[-2000:]
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  steps = [int(p) for p in os.listdir(tmp_path / 'run' / 'checkpoints') if p.isdigit()]
  assert results['checkpoint_step'] == max(steps) and 'Test: loss' in out


def test_the_error_line_stays_last_whatever_libraries_log_after_it(tmp_path):
  # An error ends in one line, the last on stderr: what libraries log afterwards (orbax's
  # threads after a failed save, here an absl ERROR line and a native write at exit) is not
  # shown after it. Signals are ignored from then on: the exit status stays 2.
  script = tmp_path / 'late.py'
  script.write_text(
      'import atexit, os, sys\n'
      f'sys.path.insert(0, {str(ROOT)!r})\n'
      'sys.argv = ["launch.py"]\n'
      'import launch\n'
      'from absl import logging\n'
      'atexit.register(lambda: os.write(2, b"E1203 native library line\\n"))\n'
      'atexit.register(lambda: os.kill(os.getpid(), 15))\n'
      'atexit.register(lambda: logging.error("RESOURCE_EXHAUSTED: late library line"))\n'
      'launch.fail("could not write checkpoint 7: No space left on device; free space")\n')
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines() == [
      'error: could not write checkpoint 7: No space left on device; free space']


def test_a_bad_debug_pause_at_is_one_line(tmp_path, processes):
  proc = processes.run(launch_args('--config=configs/default.py', f'--workdir={tmp_path / "w"}',
                                   '--debug_pause_at=step:soon'), cwd=ROOT)
  line = _one_error_line(proc)
  assert line.startswith("error: --debug_pause_at: 'step:soon' is not a phase; give one or "
                         "more of starting, preparing, compiling, step:N"), line
  assert not (tmp_path / 'w').exists()


def test_ctrl_c_in_the_python_api_is_a_keyboard_interrupt_after_the_checkpoint(config,
                                                                                tmp_path):
  # A notebook's `try: digitjax.train(...) except Exception:` must not swallow a Ctrl-C and
  # go on with its next run: the stop propagates as a KeyboardInterrupt, once the step it
  # stopped at is saved.
  import threading
  config.chunk_steps = 5
  workdir = tmp_path / 'run'

  def interrupt_when_paused():
    while 'step' in signals._State.pauses:  # the pause takes its entry when it starts
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)

  signals.pause_at('step:10')
  thread = threading.Thread(target=interrupt_when_paused, daemon=True)
  thread.start()
  try:
    with pytest.raises(KeyboardInterrupt) as stopped:
      try:
        digitjax.train(config, str(workdir))
      except Exception as e:  # what a notebook's loop would catch
        pytest.fail(f'the Ctrl-C was an Exception: {e!r}')
  finally:
    signals.pause_at('')
    thread.join(timeout=60)
  assert stopped.value.step == 10 and stopped.value.exit_status == 130
  steps = [int(p) for p in os.listdir(workdir / 'checkpoints') if p.isdigit()]
  assert max(steps) == 10
