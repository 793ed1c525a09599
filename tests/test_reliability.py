"""Issue 6, end to end: killed, preempted or fed bad input, a run loses nothing and resumes
bit-exactly. Each behaviour is driven through `python launch.py` in real subprocesses; a few
finer points (array shapes, a `checkpoints` file, validation_fraction=0) are checked in-process.

One uninterrupted reference run (module fixture) is the yardstick: interrupted runs must end with
its exact arrays, and damaged copies of its workdir feed the fallback and error tests.
"""
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cannot_mount, launch_args, wait_for, write_dataset
from digitjax import workdir as workdir_lib

pytestmark = pytest.mark.slow
EPOCHS = 5
STEPS_PER_EPOCH = 225  # 2000 training examples less 10% for validation, in batches of 8
TOTAL = EPOCHS * STEPS_PER_EPOCH
TIMEOUT = 300  # seconds for one run; generous, the CPU may be shared
KILL_SEED = 20261130  # the SIGKILL test's steps come from this seed (printed with any failure)


# ---------------------------------------------------------------------------------------------
# Running launch.py


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Synthetic digits with 20% wrong labels, so the loss never reaches zero and every step
  changes the parameters (a wrong example order would show)."""
  root = tmp_path_factory.mktemp('reliability')
  return write_dataset(root / 'idx', n_train=2000, n_test=100, label_noise=0.2), root / 'tfds'


def command(workdir, data, *overrides):
  idx, tfds = data
  return launch_args('--config=configs/default.py', f'--workdir={workdir}',
                     f'--config.data.manual_dir={idx}', f'--config.data.data_dir={tfds}',
                     '--config.data.verify_checksums=False', '--config.batch_size=8',
                     f'--config.num_epochs={EPOCHS}', '--config.eval_batch_size=50',
                     '--config.plots=False',
                     '--config.chunk_steps=5',  # the scan: a signal is acted on within 5 steps
                     # Randomness drawn per step, which a resumed run must draw again identically.
                     '--config.model.dropout_rate=0.25', '--config.augment.enabled=True',
                     *overrides)


def run(workdir, data, *overrides):
  return subprocess.run(command(workdir, data, *overrides), cwd=ROOT, capture_output=True,
                        text=True, timeout=TIMEOUT)


class Paused:
  """A launch.py run held at a step by --debug_pause_at=step:N: the test acts when the run is
  there, not after a sleep. Killed and reaped when the test ends."""

  def __init__(self, processes, workdir, data, logs: pathlib.Path, step: int, also: str = ''):
    self.out, self.err = logs.with_suffix('.stdout'), logs.with_suffix('.stderr')
    pause = ','.join(filter(None, [f'step:{step}', also]))
    self.proc = processes.popen(command(workdir, data, f'--debug_pause_at={pause}'),
                                cwd=ROOT,
                                stdout=open(self.out, 'w'), stderr=open(self.err, 'w'))
    self.step = int(self.wait_for(r'digitjax: paused at step (\d+)', self.stderr).group(1))

  def stdout(self) -> str:
    return self.out.read_text()

  def stderr(self) -> str:
    return self.err.read_text()

  def wait_for(self, pattern: str, read):
    return wait_for(self.proc, read, pattern)

  def finish(self) -> int:
    return self.proc.wait(timeout=TIMEOUT)


def last_error_line(proc) -> str:
  return proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Reading checkpoints


def checkpoint_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir()
                if p.name.isdigit())


def arrays(workdir, step=TOTAL) -> dict[str, np.ndarray]:
  """Every array of a checkpoint's train state (step, params, optimizer state), by name."""
  import jax
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / 'checkpoints' / str(step) /
                                            'state')
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_bit_identical(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  different = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
  assert not different, f'arrays differ: {different}'


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
  """An uninterrupted run: its workdir, finished at step TOTAL."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  proc = run(workdir, data)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert checkpoint_steps(workdir)[-1] == TOTAL
  assert not (workdir / workdir_lib.LOCK_FILE).exists()  # released on exit
  return workdir


@pytest.fixture
def copy_of_reference(reference, tmp_path):
  """A copy of the finished reference run, without results.json (so it is not 'done')."""
  workdir = tmp_path / 'copy'
  shutil.copytree(reference, workdir)
  (workdir / 'results.json').unlink()
  return workdir


def data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest file of a checkpoint: the one holding the arrays' bytes."""
  return max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


# ---------------------------------------------------------------------------------------------
# 1. Bit-exact resume after SIGKILL; 6. the stale lock it leaves is taken over


@pytest.mark.parametrize('draw', [0, 1])
def test_sigkill_at_a_random_step_then_restart_ends_bit_identical(reference, data, tmp_path,
                                                                  processes, draw):
  at = random.Random(KILL_SEED + draw).randrange(STEPS_PER_EPOCH + 1, TOTAL)
  note = f'(kill at step {at}, drawn from seed {KILL_SEED + draw})'
  workdir = tmp_path / 'run'
  held = Paused(processes, workdir, data, tmp_path / 'killed', at)
  held.proc.kill()
  assert held.finish() == -signal.SIGKILL, note
  steps = checkpoint_steps(workdir)
  assert steps and steps[-1] < TOTAL, (steps, note)
  assert (workdir / workdir_lib.LOCK_FILE).exists()  # left behind by the killed process

  restarted = run(workdir, data)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert f'Resuming from checkpoint at step {steps[-1]} ' in restarted.stdout, note
  assert 'Taking over the stale lock' in restarted.stderr
  assert_bit_identical(arrays(workdir), arrays(reference))
  epochs = [r['epoch'] for r in workdir_lib.read_jsonl(str(workdir / 'metrics.jsonl'))
            if 'epoch' in r]
  assert epochs == list(range(1, EPOCHS + 1)), note  # every epoch once, none repeated


# ---------------------------------------------------------------------------------------------
# 2. Preemption: SIGTERM mid-epoch; a second signal while saving; 6. the lock while it runs


def test_sigterm_mid_epoch_saves_that_step_and_resumes_to_the_same_parameters(
    reference, data, tmp_path, processes):
  workdir = tmp_path / 'run'
  held = Paused(processes, workdir, data, tmp_path / 'preempted', 2 * STEPS_PER_EPOCH + 100,
                also=f'saving:{2 * STEPS_PER_EPOCH + 100}')
  lock = (workdir / workdir_lib.LOCK_FILE).read_text().split()
  assert lock[0] == str(held.proc.pid)  # the lock names its owner
  held.proc.send_signal(signal.SIGTERM)
  held.wait_for('digitjax: paused at saving', held.stderr)
  held.proc.send_signal(signal.SIGTERM)  # a second one, while it saves
  assert held.finish() == 143, held.stderr()[-3000:]

  stopped = re.search(r'Stopped by SIGTERM at step (\d+); checkpoint saved', held.stdout())
  assert stopped, held.stdout()[-2000:]
  step = int(stopped.group(1))
  assert step == held.step == 2 * STEPS_PER_EPOCH + 100  # the very step it was held at
  assert 'received again' in held.stderr()
  assert checkpoint_steps(workdir)[-1] == step  # kept: among the latest, though without metrics
  assert not (workdir / workdir_lib.LOCK_FILE).exists()
  assert not list((workdir / 'checkpoints').glob('*orbax-checkpoint-tmp*'))

  resumed = run(workdir, data)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  epoch, within = divmod(step, STEPS_PER_EPOCH)
  assert (f'Resuming from checkpoint at step {step} (epoch {epoch + 1}, step {within} of it)'
          in resumed.stdout)
  assert f'Epoch {epoch}/{EPOCHS}' not in resumed.stdout  # no epoch is redone
  assert_bit_identical(arrays(workdir), arrays(reference))


# ---------------------------------------------------------------------------------------------
# 3. Damaged checkpoints


def test_damaged_newest_checkpoints_fall_back_and_unfinished_saves_are_ignored(
    reference, copy_of_reference, data):
  workdir = copy_of_reference
  checkpoints = workdir / 'checkpoints'
  *older, previous, newest = checkpoint_steps(workdir)
  big = data_file(checkpoints / str(newest))
  with open(big, 'r+b') as f:  # truncated
    f.truncate(big.stat().st_size // 2)
  big = data_file(checkpoints / str(previous))
  with open(big, 'r+b') as f:  # same size, some bytes rotten
    f.seek(big.stat().st_size // 2)
    f.write(bytes(4096))
  # A save killed before orbax renamed it into place: complete-looking, but never to be restored.
  unfinished = checkpoints / f'{TOTAL + 1000}.orbax-checkpoint-tmp-1700000000'
  shutil.copytree(reference / 'checkpoints' / str(newest), unfinished)

  proc = run(workdir, data)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Ignoring 1 unfinished checkpoint save' in proc.stderr
  assert f'checkpoints/{newest} is damaged' in proc.stderr
  assert f'checkpoints/{previous} is damaged' in proc.stderr
  assert f'Resuming from checkpoint at step {older[-1]} ' in proc.stdout
  assert not unfinished.exists()
  assert sorted(os.listdir(workdir / 'damaged_checkpoints')) == sorted([str(previous), str(newest)])
  assert_bit_identical(arrays(workdir), arrays(reference))


def test_no_readable_checkpoint_is_an_error_and_nothing_starts_over(copy_of_reference, data):
  workdir = copy_of_reference
  steps = checkpoint_steps(workdir)
  for step in steps:
    (workdir / 'checkpoints' / str(step) / 'meta' / 'metadata').write_text('{"trunc')
  proc = run(workdir, data)
  assert proc.returncode == 2
  line = last_error_line(proc)
  assert line.startswith(f'error: no readable checkpoint in {workdir / "checkpoints"} (step ')
  assert all(f'step {s}:' in line for s in steps)
  assert 'Epoch' not in proc.stdout
  assert checkpoint_steps(workdir) == steps  # nothing moved, nothing new
  assert not (workdir / 'damaged_checkpoints').exists()


# ---------------------------------------------------------------------------------------------
# 4. A config that does not fit the checkpoint


def test_changed_layer_width_is_a_one_line_error(copy_of_reference, data):
  steps = checkpoint_steps(copy_of_reference)
  proc = run(copy_of_reference, data, '--config.model.conv_features=(32,48,64)')
  assert proc.returncode == 2
  assert last_error_line(proc) == (
      f'error: checkpoint {copy_of_reference / "checkpoints"}/{TOTAL} does not fit the config: '
      f'model.conv_features=[32, 64, 64] in the checkpoint but [32, 48, 64] in the config; use '
      f'the checkpoint\'s settings or a new --workdir')
  assert 'Traceback' not in proc.stderr
  assert checkpoint_steps(copy_of_reference) == steps


def test_shapes_are_checked_even_when_the_record_says_nothing(reference, tmp_path):
  """Without the config record (older checkpoints), the arrays' shapes still name the change."""
  from conftest import small_config
  from digitjax import checkpoint as ckpt_lib, inference, parallel
  config = small_config(tmp_path, tmp_path, **{'model.dense_features': 64})
  target = inference.abstract_state(config, parallel.make_mesh())
  checkpoints = ckpt_lib.Checkpoints(reference / 'checkpoints', read_only=True)
  with pytest.raises(ckpt_lib.CheckpointMismatch,
                     match=r'array params\.dense1\.bias is of shape \(100,\) in the '
                           r'checkpoint but of shape \(64,\) in the model'):
    checkpoints.check_shapes(TOTAL, target)
  checkpoints.close()


# ---------------------------------------------------------------------------------------------
# 5. Invalid config values: tests/test_configlib.py in-process, tests/test_launch.py end to end


def test_validation_fraction_zero_trains_and_records_no_fake_numbers(reference, data, tmp_path):
  """The bottom of [0, 1) works: no validation split, so no validation numbers (null, not NaN,
  in results.json and metrics.jsonl), and no crash."""
  import json
  import digitjax
  from conftest import small_config
  config = small_config(*data, validation_fraction=0.0, **{'data.max_train_examples': 400})
  results = digitjax.train(config, str(tmp_path / 'run'))  # `reference` prepared the data
  assert results['val_accuracy'] is None and results['val_loss'] is None
  assert results['test_accuracy'] > 0.3  # it trained: chance is 0.1
  for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f'{c} in {line}'))
    assert record.get('val_loss', None) is None


# ---------------------------------------------------------------------------------------------
# 6. One run per workdir


def test_second_run_on_a_workdir_refuses_to_start(data, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  fd = workdir_lib.acquire(str(workdir))  # this test process is the run holding the workdir
  try:
    proc = run(workdir, data)
  finally:
    workdir_lib.release(str(workdir), fd)
  assert proc.returncode == 2
  assert last_error_line(proc).startswith(
      f'error: --workdir={workdir} is in use by another run (process {os.getpid()} on ')
  assert os.listdir(workdir) == []  # it wrote nothing


# ---------------------------------------------------------------------------------------------
# 7. Unwritable or full workdir


def test_workdir_under_a_regular_file_is_a_clear_error(data, tmp_path):
  (tmp_path / 'file').write_text('not a directory')
  proc = run(tmp_path / 'file' / 'run', data)
  assert proc.returncode == 2
  assert last_error_line(proc) == (
      f'error: cannot write to --workdir={tmp_path / "file" / "run"}: a folder on its path is a '
      f'file ({tmp_path / "file" / "run"}); checkpoints saved before are untouched; use a '
      f'directory path for --workdir, then run the same command')
  proc = run(tmp_path / 'file', data)
  assert last_error_line(proc).startswith(
      f'error: cannot write to --workdir={tmp_path / "file"}: it is a file, not a directory')


def test_checkpoints_path_that_is_a_file_is_a_clear_error(tmp_path):
  from digitjax import checkpoint as ckpt_lib
  from digitjax.errors import UserError
  (tmp_path / 'checkpoints').write_text('not a directory')
  with pytest.raises(UserError, match='checkpoints is not a directory, so checkpoints cannot be '
                                      'written there'):
    ckpt_lib.Checkpoints(tmp_path / 'checkpoints')


def _mount(*args) -> str | None:
  """None if the mount was made, else why not."""
  proc = subprocess.run(['mount', *args], capture_output=True, text=True)
  return proc.stderr.strip() or f'mount exited {proc.returncode}' if proc.returncode else None


@pytest.fixture
def mounts():
  """Mounts made by a test (root only: skipped elsewhere with the reason), undone
  afterwards."""
  made = []

  def mount(*args):
    why = _mount(*args)
    if why:
      cannot_mount(why)
    if args[-1] not in made:  # a remount changes a mount, it adds none
      made.append(args[-1])

  yield mount
  for target in reversed(made):
    subprocess.run(['umount', target], check=True)


def test_read_only_workdir_is_a_clear_error_and_checkpoints_stay(copy_of_reference, data,
                                                                  tmp_path, mounts):
  before = arrays(copy_of_reference)
  ro = tmp_path / 'ro'
  ro.mkdir()
  mounts('--bind', str(copy_of_reference), str(ro))
  mounts('-o', 'remount,ro,bind', str(ro))
  proc = run(ro, data, f'--config.num_epochs={EPOCHS + 1}')
  assert proc.returncode == 2
  assert last_error_line(proc).startswith(
      f'error: cannot write to --workdir={ro}: Read-only file system')
  assert_bit_identical(arrays(ro), before)


def test_full_disk_while_saving_is_a_clear_error_and_older_checkpoints_stay(
    copy_of_reference, data, tmp_path, mounts):
  full = tmp_path / 'full'
  full.mkdir()
  used_kb = sum(p.stat().st_size for p in copy_of_reference.rglob('*') if p.is_file()) // 1024
  checkpoint_kb = data_file(copy_of_reference / 'checkpoints' / str(TOTAL)).stat().st_size // 1024
  # Room for everything but one more checkpoint (tmpfs counts 4 KiB pages per file).
  mounts('-t', 'tmpfs', '-o', f'size={used_kb + 400 + checkpoint_kb // 2}k', 'tmpfs', str(full))
  workdir = full / 'run'
  shutil.copytree(copy_of_reference, workdir)
  steps = checkpoint_steps(workdir)

  proc = run(workdir, data, f'--config.num_epochs={EPOCHS + 1}')
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = last_error_line(proc)
  assert line.startswith('error: ') and 'No space left on device' in line, proc.stderr[-4000:]
  assert checkpoint_steps(workdir) == steps
  assert_bit_identical(arrays(workdir), arrays(copy_of_reference))


def test_orbax_background_tracebacks_become_one_line(tmp_path, caplog):
  # A failed background save is logged by orbax's own thread with the whole traceback; the
  # user sees its reason once, on one line (the full-disk test above checks the error itself).
  import logging
  from digitjax import checkpoint as ckpt_lib
  ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints')).close()  # installs the filter
  try:
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.conv1.kernel" in OCDBT database'
                     '\n: Failed to write 299897 bytes: No space left on device [os_error_code=28]')
  except ValueError:
    exc_info = sys.exc_info()
  absl_logger = logging.getLogger('absl')
  record = absl_logger.makeRecord('absl', logging.ERROR, '/site-packages/orbax/checkpoint/x.py', 1,
                                  'Failed to run %d commit operations', (2,), exc_info)
  with caplog.at_level(logging.ERROR):
    absl_logger.handle(record)
  logged = caplog.records[-1]
  assert logged.exc_info is None
  assert logged.getMessage() == 'Failed to run 2 commit operations: No space left on device'
  assert '\n' not in caplog.text.strip()

  # The same failure in a save's other parallel writes, logged by asyncio when their tasks or
  # futures are collected (possibly after the error line), is dropped; other errors are not.
  orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'serialization.py')
  namespace = {}
  exec(compile('def write_fragment():\n  raise ValueError("No space left on device")\n',
               orbax_file, 'exec'), namespace)
  asyncio_logger = logging.getLogger('asyncio')

  def tensorstore_future():  # no Python frame of orbax's, but orbax's temporary directory
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local file'
                     f' "run/checkpoints/1350{ckpt_lib.TMP_SUFFIX}/state": No space left on device')

  for write, expect_logged in ((namespace['write_fragment'], False), (tensorstore_future, False),
                               (lambda: 1 / 0, True)):
    caplog.clear()
    try:
      write()
    except Exception:
      exc_info = sys.exc_info()
    with caplog.at_level(logging.ERROR):
      asyncio_logger.error('Task exception was never retrieved\nfuture: <Task finished>',
                           exc_info=exc_info)
    assert bool(caplog.records) == expect_logged


def test_closed_event_loop_callbacks_after_a_failed_save_are_not_printed(monkeypatch):
  # TensorStore finishes a failed save's other writes after orbax closed its event loop; their
  # callbacks' RuntimeError goes to sys.unraisablehook. Dropped; other unraisables are not.
  import types
  from digitjax import checkpoint as ckpt_lib
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  ckpt_lib._install_unraisablehook()
  ckpt_lib._install_unraisablehook()  # once only: no hook wrapping our own

  def call_soon_threadsafe():
    raise RuntimeError('Event loop is closed')

  for fail in (call_soon_threadsafe, lambda: 1 / 0):
    try:
      fail()
    except Exception as e:
      sys.unraisablehook(types.SimpleNamespace(exc_type=type(e), exc_value=e, err_msg=None,
                                               exc_traceback=e.__traceback__, object=None))
  assert [type(u.exc_value) for u in seen] == [ZeroDivisionError]


# ---------------------------------------------------------------------------------------------
# 8. Non-finite loss


def test_non_finite_loss_stops_with_an_error_and_the_last_checkpoint_stays(copy_of_reference,
                                                                           data):
  steps = checkpoint_steps(copy_of_reference)
  proc = run(copy_of_reference, data, f'--config.num_epochs={EPOCHS + 1}',
             '--config.learning_rate=1e6')
  assert proc.returncode == 2
  line = last_error_line(proc)
  bad = re.match(r'error: the training loss became non-finite at step (\d+); nothing after the '
                 rf'last checkpoint \(\[{TOTAL}\]\) was saved; lower config.learning_rate$', line)
  assert bad, line
  assert TOTAL <= int(bad.group(1)) < TOTAL + STEPS_PER_EPOCH
  assert checkpoint_steps(copy_of_reference) == steps
  assert not (copy_of_reference / 'results.json').exists()
