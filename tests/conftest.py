"""Shared fixtures: small IDX datasets written by the tests, and a small config around them."""
import gzip
import os
import pathlib
import struct
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'configs'))
MNIST_DIR = ROOT.parent / 'shared' / 'data' / 'mnist'


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


def write_dataset(directory, n_train=400, n_test=100, seed=0) -> pathlib.Path:
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for prefix, n, s in (('train', n_train, seed), ('t10k', n_test, seed + 1)):
    images, labels = synthetic_digits(n, s)
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


def mnist_available() -> bool:
  return all((MNIST_DIR / f'{s}.gz').exists() for s in (
      'train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
      't10k-labels-idx1-ubyte'))


requires_mnist = pytest.mark.skipif(
    not mnist_available(), reason=f'real MNIST IDX files not found in {MNIST_DIR}')


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
