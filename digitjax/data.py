"""Data: MNIST-format datasets prepared and read by tensorflow-datasets, batched by index.

Offline, `data.manual_dir` holds the four standard IDX files; they are validated by content
(magic, shapes, counts, and for MNIST the SHA-256 of the decompressed bytes), written into
`data.data_dir` as a regular tfds dataset of the same name and version, and from then on read
through tfds like any other. Nothing here touches the network when `manual_dir` is set.

Example order is a pure function of (seed, epoch): `epoch_permutation` gives it, and a batch is
a slice of it, so a run can resume mid-epoch bit-exactly and every host can pick its own share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import time
import zlib

import numpy as np

from digitjax.configlib import SUPPORTED_DATASETS, split_seed
from digitjax.errors import UserError

IDX_STEMS = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
             'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
# SHA-256 of the decompressed original files (shared/data/mnist/README.md).
SHA256 = {'mnist': {
    'train-images-idx3-ubyte': 'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db',
    'train-labels-idx1-ubyte': '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5',
    't10k-images-idx3-ubyte': '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7',
    't10k-labels-idx1-ubyte': 'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2',
}}
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# IDX files


def _find_idx(manual_dir: str, stem: str) -> str:
  for name in (stem + '.gz', stem):
    path = os.path.join(manual_dir, name)
    if os.path.isfile(path):
      return path
  raise UserError(f'{os.path.join(manual_dir, stem + ".gz")}: missing; data.manual_dir must hold '
                  f'the four IDX files ({", ".join(s + ".gz" for p in IDX_STEMS.values() for s in p)})')


def read_idx(path: str, expect_ndim: int, sha256: str | None = None) -> np.ndarray:
  """Reads an IDX ubyte file (gzipped or not), checking magic, dims, size and optional digest."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    if raw[:2] == b'\x1f\x8b':
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise UserError(f'{path}: not a readable gzip file ({e}); replace it with an intact copy') from e
  if len(raw) < 4 or raw[:2] != b'\0\0' or raw[2] != 0x08 or raw[3] != expect_ndim:
    raise UserError(f'{path}: not an IDX file of unsigned bytes with {expect_ndim} dimension(s) '
                    f'(magic {raw[:4].hex() or "missing"}); replace it with an intact copy')
  header = 4 + 4 * expect_ndim
  if len(raw) < header:
    raise UserError(f'{path}: truncated header; replace it with an intact copy')
  dims = tuple(int(d) for d in np.frombuffer(raw[4:header], '>u4'))
  expected = int(np.prod(dims)) + header
  if len(raw) != expected:
    raise UserError(f'{path}: {"truncated" if len(raw) < expected else "has trailing bytes"}: '
                    f'header says {dims} ({expected} bytes) but it holds {len(raw)} bytes; '
                    f'replace it with an intact copy')
  if sha256 is not None:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
      raise UserError(f'{path}: content differs from the original (sha256 {digest[:12]}... != '
                      f'{sha256[:12]}...); replace it, or set data.verify_checksums=False for a '
                      f'modified copy')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_idx_head(path: str, expect_ndim: int, n: int) -> np.ndarray:
  """The first `n` items of an IDX ubyte file (gzipped or not), read from its start only: the
  whole file was checked (read_idx) when the dataset was prepared from it."""
  try:
    with open(path, 'rb') as f:
      gzipped = f.read(2) == b'\x1f\x8b'
    with (gzip.open if gzipped else open)(path, 'rb') as f:
      header = f.read(4 + 4 * expect_ndim)
      if len(header) < 4 + 4 * expect_ndim or header[:3] != b'\0\0\x08' or (
          header[3] != expect_ndim):
        raise UserError(f'{path}: not an IDX file of unsigned bytes with {expect_ndim} '
                        f'dimension(s) (magic {header[:4].hex() or "missing"}); replace it with '
                        f'an intact copy')
      dims = tuple(int(d) for d in np.frombuffer(header[4:], '>u4'))
      count, size = min(n, dims[0]), int(np.prod(dims[1:]))
      body = f.read(count * size)
  except (OSError, EOFError, zlib.error) as e:
    raise UserError(f'{path}: not a readable gzip file ({e}); replace it with an intact '
                    f'copy') from e
  if len(body) < count * size:
    raise UserError(f'{path}: truncated: header says {dims}; replace it with an intact copy')
  return np.frombuffer(body, np.uint8).reshape((count,) + dims[1:])


def read_idx_split(manual_dir: str, split: str, dataset: str,
                   verify_checksums: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Images (N,28,28,1) uint8 and labels (N,) of one split from validated IDX files."""
  if not os.path.isdir(manual_dir):
    raise UserError(f'data.manual_dir={manual_dir}: no such directory; point it at the folder '
                    f'holding the four IDX .gz files')
  pins = SHA256.get(dataset, {}) if verify_checksums else {}
  image_stem, label_stem = IDX_STEMS[split]
  image_path, label_path = _find_idx(manual_dir, image_stem), _find_idx(manual_dir, label_stem)
  images = read_idx(image_path, 3, pins.get(image_stem))
  labels = read_idx(label_path, 1, pins.get(label_stem))
  if images.shape[1:] != IMAGE_SHAPE[:2]:
    raise UserError(f'{image_path}: images are {images.shape[1:]}, expected {IMAGE_SHAPE[:2]}')
  if len(labels) != len(images):
    raise UserError(f'{label_path}: {len(labels)} labels for {len(images)} images in '
                    f'{image_path}; the two files must come from the same split')
  if labels.size and labels.max() >= NUM_CLASSES:
    raise UserError(f'{label_path}: label {labels.max()} outside 0..{NUM_CLASSES - 1}')
  return images[..., None], labels


# ---------------------------------------------------------------------------------------------
# tfds preparation and reading


def _tensorflow_off_gpu() -> None:
  """TensorFlow only writes and reads data files here: keep it off any GPU so JAX has them.

  Called before the tfds paths that import TensorFlow (preparing a dataset); the array_record
  reader never does. Its C++ start-up notices stay off the console (metrics.quiet_native_stderr).
  """
  from digitjax import metrics
  with metrics.quiet_native_stderr():
    import tensorflow as tf
    tf.config.set_visible_devices([], 'GPU')


def _local_builder(dataset: str, manual_dir: str, verify_checksums: bool, data_dir: str | None):
  """A tfds builder of `dataset` whose examples come from validated local IDX files.

  It subclasses tfds's own builder and keeps its name, version and features, so the prepared
  files are exactly what tfds would have written after a download.
  """
  import tensorflow_datasets as tfds

  base = tfds.builder_cls(dataset)

  class LocalIdx(base, skip_registration=True):
    name = dataset

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      return {split: self._generate_examples(split) for split in IDX_STEMS}

    def _generate_examples(self, split):
      images, labels = read_idx_split(manual_dir, split, dataset, verify_checksums)
      for i in range(len(labels)):
        yield i, {'image': images[i], 'label': int(labels[i])}

  return LocalIdx(data_dir=data_dir, file_format='array_record')


def prepare(dataset: str, data_dir: str | None = None, manual_dir: str | None = None,
            verify_checksums: bool = True):
  """Returns a prepared tfds builder for `dataset`, preparing it once if needed."""
  import tensorflow_datasets as tfds

  if dataset not in SUPPORTED_DATASETS:
    raise UserError(f'dataset={dataset!r} is not supported; use one of {SUPPORTED_DATASETS}')
  with _tfds_tempdir():
    builder = tfds.builder(dataset, data_dir=data_dir)
    if builder.is_prepared():
      return builder
    with _preparing(str(builder.data_dir_root), dataset):
      if not tfds.builder(dataset, data_dir=data_dir).is_prepared():  # another run may have
        _prepare(builder, dataset, data_dir, manual_dir, verify_checksums)
    return tfds.builder(dataset, data_dir=data_dir)


@contextlib.contextmanager
def _tfds_tempdir():
  """Points tempfile at a private folder, removed on exit, while tfds builders are made.

  tfds makes an empty tempfile.mkdtemp('tfds') for every builder of a dataset it has not
  prepared yet (DatasetInfo.initialize_from_bucket) and never removes it: without this, each
  first run and each test that prepares data left one or more empty folders in /tmp.
  """
  previous = tempfile.tempdir
  try:
    private = tempfile.mkdtemp(prefix='digitjax-tfds-')
  except OSError:  # no writable temp folder: tfds's own mkdtemp would fail or not be reached
    yield
    return
  tempfile.tempdir = private
  try:
    yield
  finally:
    tempfile.tempdir = previous
    shutil.rmtree(private, ignore_errors=True)


@contextlib.contextmanager
def _preparing(root: str, dataset: str):
  """Holds a lock on preparing `dataset` in `root`: runs that start together (other workdirs,
  the same data_dir) wait for the one preparing it, then find it prepared."""
  try:
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, f'.digitjax-preparing-{dataset}.lock'),
                 os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f'cannot prepare {dataset} in data.data_dir={root}: {e.strerror}; make it '
                    f'writable or set --config.data.data_dir to another folder') from e
  try:
    waiting = False
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if not waiting:
          logging.warning('Another run is preparing %s in %s; waiting for it', dataset, root)
          waiting = True
        from digitjax import signals
        signals.check('while waiting for another run to prepare the data; nothing was written')
        time.sleep(0.2)
    yield
  finally:
    os.close(fd)  # releases the lock


def _prepare(builder, dataset, data_dir, manual_dir, verify_checksums) -> None:
  import tensorflow_datasets as tfds
  from digitjax import signals
  signals.reached('preparing')
  _tensorflow_off_gpu()
  if manual_dir:
    # Validate every file before tfds writes anything, so a bad file leaves no partial dataset.
    for split in IDX_STEMS:
      read_idx_split(manual_dir, split, dataset, verify_checksums)
    logging.info('Preparing %s from %s into %s', dataset, manual_dir, builder.data_dir_root)
    local = _local_builder(dataset, manual_dir, verify_checksums, data_dir)
    local.download_and_prepare()
  else:
    try:
      builder = tfds.builder(dataset, data_dir=data_dir, file_format='array_record')
      builder.download_and_prepare()
    except Exception as e:  # tfds raises many kinds of errors when offline
      raise UserError(f'could not download {dataset} ({type(e).__name__}); offline, set '
                      f'--config.data.manual_dir=DIR to a folder with the four IDX .gz files') from e


def read_split(builder, split: str, cache: bool = True) -> dict[str, np.ndarray]:
  """A whole split as numpy: image (N,28,28,1) uint8, label (N,) int32.

  tfds decodes one PNG per example in Python (~6 s for MNIST's 60,000); with `cache`, the decoded
  arrays are kept beside the prepared dataset and reused while its files are unchanged.
  """
  cache_path = _cache_path(builder, split) if cache else None
  if cache_path and os.path.exists(cache_path):
    try:
      with np.load(cache_path) as arrays:
        if str(arrays['fingerprint']) == _fingerprint(builder, split):
          return {'image': arrays['image'], 'label': arrays['label']}
    except (OSError, ValueError, KeyError, zlib.error):
      pass  # damaged or stale cache: read through tfds and rewrite it
  arrays = _read_split_tfds(builder, split)
  if cache_path:
    try:
      tmp = f'{cache_path}.{os.getpid()}.tmp.npz'
      np.savez(tmp, fingerprint=_fingerprint(builder, split), **arrays)
      os.replace(tmp, cache_path)
    except OSError as e:  # a read-only data_dir still works, only slower
      logging.warning('Could not cache decoded %s/%s (%s)', builder.name, split, e)
  return arrays


def _cache_path(builder, split: str) -> str:
  return os.path.join(str(builder.data_dir), f'digitjax-decoded-{split}.npz')


def _fingerprint(builder, split: str) -> str:
  """Names, sizes and mtimes of the split's tfds files: any rewrite of them changes it."""
  files = sorted(f for f in os.listdir(str(builder.data_dir))
                 if f.startswith(f'{builder.name}-{split}.'))
  stats = [(f, os.stat(os.path.join(str(builder.data_dir), f))) for f in files]
  return ';'.join(f'{f}:{st.st_size}:{st.st_mtime_ns}' for f, st in stats)


def _read_split_tfds(builder, split: str) -> dict[str, np.ndarray]:
  from tensorflow_datasets.core import file_adapters
  import tensorflow_datasets as tfds

  if builder.info.file_format == file_adapters.FileFormat.ARRAY_RECORD:
    source = builder.as_data_source(split=split)  # random access; no TensorFlow needed
    examples = source.__getitems__(range(len(source)))
    images = (np.stack([ex['image'] for ex in examples]) if examples
              else np.zeros((0,) + IMAGE_SHAPE, np.uint8))
    labels = np.array([ex['label'] for ex in examples], np.int32)
  else:  # a tfrecord copy tfds prepared earlier
    _tensorflow_off_gpu()
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = arrays['image'], arrays['label'].astype(np.int32)
  return {'image': np.ascontiguousarray(images, np.uint8), 'label': labels}


@dataclasses.dataclass
class Splits:
  train: dict[str, np.ndarray]
  val: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  firsts: dict | None = None  # the images the pictures show first (first_images), when asked

  def counts(self) -> dict[str, list[int]]:
    return {name: np.bincount(split['label'], minlength=NUM_CLASSES).tolist()
            for name, split in (('train', self.train), ('val', self.val), ('test', self.test))}


def holdout_indices(n: int, fraction: float, seed: int, max_examples: int = 0):
  """(train, val) index arrays: a seeded shuffle of the training split, `fraction` held out."""
  order = np.random.default_rng(seed).permutation(n)
  if max_examples:
    order = order[:max_examples]
  n_val = int(round(len(order) * fraction))
  return np.sort(order[n_val:]), np.sort(order[:n_val])


def load_splits(config, firsts: bool = False) -> Splits:
  """Train/val/test arrays for config.dataset: tfds-prepared, validation held out by the seed
  configlib.split_seed gives (a population's members share the holdout of its base seed);
  with `firsts`, the images the pictures show first as well (first_images)."""
  from digitjax import parallel
  d = config.data
  args = (config.dataset, d.data_dir or None, d.manual_dir or None, d.verify_checksums)
  if parallel.is_main_process():  # one writer: the others wait, then read what it prepared
    prepare(*args)
  parallel.barrier('digitjax:data-prepared')
  builder = prepare(*args)
  full_train = read_split(builder, 'train', d.cache_decoded)
  test = read_split(builder, 'test', d.cache_decoded)
  from digitjax import signals
  signals.check('while preparing the data; what was prepared is complete')
  train_idx, val_idx = holdout_indices(len(full_train['label']), config.validation_fraction,
                                       split_seed(config), d.max_train_examples)
  take = lambda split, idx: {k: v[idx] for k, v in split.items()}
  splits = Splits(take(full_train, train_idx), take(full_train, val_idx), test)
  if firsts:
    splits.firsts = first_images(d.manual_dir, splits)
  return splits


def first_images(manual_dir: str, splits: Splits, n: int = 9) -> dict[str, dict[str, np.ndarray]]:
  """The first `n` images of MNIST's own order, as the tutorial shows them (training 5 0 4 1 9
  2 1 3 1, test 7 2 1 0 4 1 4 9 5): tfds stores its examples shuffled, so they come from the
  start of the IDX files in `manual_dir` (the rest is never read again); the test ones carry
  their `index` in splits.test (found by their pixels) for the predictions drawn on them.
  Without manual_dir, the first of tfds's order."""
  if not manual_dir:
    return {'train': {k: v[:n] for k, v in splits.train.items()},
            'test': {**{k: v[:n] for k, v in splits.test.items()},
                     'index': np.arange(min(n, len(splits.test['label'])))}}
  if not os.path.isdir(manual_dir):
    raise UserError(f'data.manual_dir={manual_dir}: no such directory; point it at the folder '
                    f'holding the four IDX .gz files')
  firsts = {}
  for split, (image_stem, label_stem) in IDX_STEMS.items():
    images = read_idx_head(_find_idx(manual_dir, image_stem), 3, n)
    labels = read_idx_head(_find_idx(manual_dir, label_stem), 1, n)
    firsts[split] = {'image': images[..., None], 'label': labels.astype(np.int32)}
  where = {splits.test['image'][i].tobytes(): i for i in range(len(splits.test['label']))}
  index = np.array([where.get(image.tobytes(), -1) for image in firsts['test']['image']])
  firsts['test']['index'] = index
  return firsts


# ---------------------------------------------------------------------------------------------
# Other writers' digits: a witness of how a model reads someone else's hand


UCI_DIGITS = 'uci_digits'


@functools.lru_cache(maxsize=1)
def _uci_digits() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:
    raise UserError(f'the {UCI_DIGITS} split is read from the copy scikit-learn installs with '
                    f'itself ({e}): pip install scikit-learn') from None
  from digitjax import images
  try:
    found = load_digits()  # reads the package's own file: no download
  except (OSError, EOFError, ValueError, zlib.error) as e:
    raise UserError(f"scikit-learn's copy of the UCI digits cannot be read "
                    f"({' '.join(str(e).split())[:120]}): reinstall scikit-learn") from None
  pixels = np.stack([images.to_mnist(ink / 16.0) for ink in found.images])[..., None]
  return pixels, found.target.astype(np.int32)


def uci_digits(dataset: str) -> dict[str, np.ndarray]:
  """1,797 handwritten digits of 13 writers who are not MNIST's: the test part of UCI's
  Optical Recognition of Handwritten Digits (Alpaydin and Kaynak, 1998), as scikit-learn ships
  it. Each is an 8x8 grid counting the ink (0-16) in 4x4 blocks of a 32x32 bitmap that NIST's
  form software cut out; predict's own `images.to_mnist` brings it to MNIST form, as it would a
  user's picture. Only a model of `dataset` 'mnist' reads digits; image (N,28,28,1) uint8 and
  label (N,) int32, as read_split gives a split. A witness, never used to choose."""
  if dataset != 'mnist':
    raise UserError(f'the {UCI_DIGITS} split holds handwritten digits, and this run learned '
                    f'{dataset}: evaluate --split=test or validation')
  pixels, labels = _uci_digits()
  return {'image': pixels.copy(), 'label': labels.copy()}


# ---------------------------------------------------------------------------------------------
# Example order


def epoch_permutation(seed: int, epoch: int, n: int):
  """The order of training examples in `epoch`: a pure function of (seed, epoch), on device.

  Every input path and every host calls this same jitted function, so all agree on the order.
  """
  import jax
  return _permutation(jax.random.fold_in(jax.random.key(seed), epoch), n)


def _permutation(key, n):
  import jax
  return jax.jit(jax.random.permutation, static_argnums=1)(key, n)


def host_batches(split: dict[str, np.ndarray], perm: np.ndarray, batch_size: int,
                 first_step: int = 0, process_index: int = 0, process_count: int = 1):
  """Yields this process's share of each global batch of one epoch, from `first_step` on.

  Batch s of the epoch is perm[s*B:(s+1)*B]; process p takes rows [p*B/P, (p+1)*B/P) of it.
  The last partial batch is dropped, so every step has the same shape.
  """
  per_process = batch_size // process_count
  for step in range(first_step, len(perm) // batch_size):
    start = step * batch_size + process_index * per_process
    idx = np.asarray(perm[start:start + per_process])
    yield {k: v[idx] for k, v in split.items()}
