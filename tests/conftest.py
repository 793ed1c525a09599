"""Shared fixtures: small IDX datasets written by the tests, a small config around them, real
MNIST when it is there, and subprocesses that never outlive their test.

Every compiled program goes to a compilation cache of this session's own (XDG_CACHE_HOME, which
launch.py's default cache follows, points into the session's temp dir): tests write nothing
outside their temp dirs, and their speed does not depend on what ran before.
"""
import gzip
import os
import pathlib
import signal
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'configs'))
MNIST_DIR = ROOT.parent / 'shared' / 'data' / 'mnist'
MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
               't10k-labels-idx1-ubyte')

_CACHE_HOME = tempfile.mkdtemp(prefix='digitjax-test-cache-')
os.environ['XDG_CACHE_HOME'] = _CACHE_HOME  # launch.py subprocesses inherit it


def pytest_configure(config):
  import jax
  # In-process runs share the session's cache too: a program compiled by one test loads in the
  # next (the tests' small configs compile the same steps over and over).
  jax.config.update('jax_compilation_cache_dir', os.path.join(_CACHE_HOME, 'digitjax', 'jax'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


def pytest_unconfigure(config):
  import shutil
  shutil.rmtree(_CACHE_HOME, ignore_errors=True)


def write_idx(path, array: np.ndarray, compress=True) -> None:
  header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
  raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
  with (gzip.open(path, 'wb') if compress else open(path, 'wb')) as f:
    f.write(raw)


def synthetic_digits(n: int, seed: int):
  """Learnable 28x28 images: a bright 6x6 blob whose position encodes the label, plus noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.uint8)
  images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
  for i, label in enumerate(labels):
    r, c = 3 + 5 * (label // 5) * 2, 2 + 5 * (label % 5)
    images[i, r:r + 6, c:c + 6] = 255
  return images, labels


def write_dataset(directory, n_train=400, n_test=100, seed=0, label_noise=0.0) -> pathlib.Path:
  """Synthetic digits as the four IDX files; `label_noise` of the labels shifted by one, so
  the loss never reaches zero and every step moves the parameters."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for prefix, n, s in (('train', n_train, seed), ('t10k', n_test, seed + 1)):
    images, labels = synthetic_digits(n, s)
    if label_noise:
      noisy = np.random.default_rng(s).random(n) < label_noise
      labels[noisy] = (labels[noisy] + 1) % 10
    write_idx(directory / f'{prefix}-images-idx3-ubyte.gz', images)
    write_idx(directory / f'{prefix}-labels-idx1-ubyte.gz', labels)
  return directory


@pytest.fixture(scope='session')
def idx_dir(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp('idx'))


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """One tfds data_dir per session: the small dataset is prepared once and then reused."""
  return tmp_path_factory.mktemp('tfds')


def small_config(idx_dir, tfds_dir, **overrides):
  import default
  config = default.get_config()
  config.data.manual_dir = str(idx_dir)
  config.data.data_dir = str(tfds_dir)
  config.data.verify_checksums = False  # synthetic files are not the original MNIST
  config.batch_size = 16
  config.eval_batch_size = 50
  config.num_epochs = 1
  config.learning_rate = 0.02
  config.plots = False
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


@pytest.fixture
def config(idx_dir, tfds_dir):
  return small_config(idx_dir, tfds_dir)


def mnist_missing() -> str | None:
  """Why ../shared/data/mnist cannot be used (a file missing, gzipped or not), or None."""
  if not MNIST_DIR.is_dir():
    return f'{MNIST_DIR} does not exist'
  missing = [s for s in MNIST_FILES
             if not (MNIST_DIR / f'{s}.gz').is_file() and not (MNIST_DIR / s).is_file()]
  return f'{MNIST_DIR} lacks {", ".join(missing)}' if missing else None


@pytest.fixture(scope='session')
def mnist_dir():
  """Real MNIST: skipped with the reason where it is absent, but a failure under CI (`CI` set),
  where a missing dataset must not pass as a green run."""
  why = mnist_missing()
  if why:
    if os.environ.get('CI'):
      pytest.fail(f'real MNIST is required in CI: {why}', pytrace=False)
    pytest.skip(f'real MNIST not available: {why}')
  return MNIST_DIR


def cannot_mount(why: str) -> None:
  """A test that needs mount skips with the reason where it is not root; as root (CI runs as
  root) a mount that fails is a failure, not a skip that would pass as a green run."""
  if os.geteuid() == 0:
    pytest.fail(f'mount failed as root: {why}', pytrace=False)
  pytest.skip(f'mount needs root (uid {os.geteuid()} here): {why}')


class Processes:
  """Subprocesses of one test, each killed (with its process group) and reaped when the test
  ends, passed or failed."""

  def __init__(self):
    self.started = []

  def popen(self, args, **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    self.started.append(proc)
    return proc

  def run(self, args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with output captured; on a timeout the child is killed and reaped."""
    proc = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill(proc)
      raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)

  @staticmethod
  def kill(proc) -> None:
    if proc.poll() is None:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    proc.wait()

  def close(self) -> None:
    for proc in self.started:
      self.kill(proc)
      for stream in (proc.stdout, proc.stderr):
        if stream:
          stream.close()


@pytest.fixture
def processes():
  procs = Processes()
  yield procs
  procs.close()


HANG_GUARD = 600  # seconds: only a hung child reaches it; no test waits on progress by the clock


def wait_for(proc, read, pattern: str):
  """Blocks until `read()` (a child's output so far) matches `pattern`: the run says when, not
  a sleep. The child's end before that fails the test; so does a hang (HANG_GUARD)."""
  import re
  import time
  start = time.monotonic()
  while not (found := re.search(pattern, read())):
    if proc.poll() is not None:
      pytest.fail(f'the run ended (status {proc.returncode}) before {pattern!r}')
    if time.monotonic() - start > HANG_GUARD:
      pytest.fail(f'the run hung: no {pattern!r} after {HANG_GUARD} s')
    time.sleep(0.02)
  return found


def launch_args(*args) -> list[str]:
  return [sys.executable, str(ROOT / 'launch.py'), *map(str, args)]


def workdir_snapshot(workdir, skip=()):
  """{relative path: (size, mtime_ns)} of every file, to prove a mode changed nothing."""
  found = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if not rel.startswith(tuple(skip)):
        stat = os.stat(path)
        found[rel] = (stat.st_size, stat.st_mtime_ns)
  return found
