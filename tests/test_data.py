import gzip
import shutil
import socket
import tempfile

import numpy as np
import pytest

from conftest import write_dataset, write_idx
from digitjax import data
from digitjax.errors import UserError


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to open a connection or resolve a name fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args[:2]}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)


def test_offline_preparation_through_tfds_without_network(tmp_path, no_network):
  src = write_dataset(tmp_path / 'idx', n_train=120, n_test=30, seed=5)
  builder = data.prepare('mnist', str(tmp_path / 'tfds'), str(src), verify_checksums=False)
  assert builder.is_prepared()
  assert (tmp_path / 'tfds' / 'mnist' / '3.0.1' / 'dataset_info.json').exists()
  train, test = data.read_split(builder, 'train'), data.read_split(builder, 'test')
  images, labels = data.read_idx_split(str(src), 'train', 'mnist', False)
  assert train['image'].shape == (120, 28, 28, 1) and train['image'].dtype == np.uint8
  assert len(test['label']) == 30
  # tfds keeps its own example order; the content is the same multiset of (image, label).
  key = lambda im, lb: sorted(zip(lb.tolist(), [x.tobytes() for x in im]))
  assert key(train['image'], train['label']) == key(images, labels)
  # Prepared once: a second call reuses it, even with the source folder gone.
  shutil.rmtree(src)
  again = data.prepare('mnist', str(tmp_path / 'tfds'), str(src), verify_checksums=False)
  assert again.info.splits['train'].num_examples == 120


def test_fashion_mnist_name_prepares_too(tmp_path, no_network):
  src = write_dataset(tmp_path / 'idx', n_train=40, n_test=20)
  builder = data.prepare('fashion_mnist', str(tmp_path / 'tfds'), str(src), False)
  assert (tmp_path / 'tfds' / 'fashion_mnist').is_dir()
  assert len(data.read_split(builder, 'test')['label']) == 20


def test_preparation_leaves_no_stray_temp_folders(tmp_path, monkeypatch):
  # tfds makes an empty mkdtemp('tfds') for each builder of an unprepared dataset; prepare
  # gives it a private folder and removes it, so the system's temp folder is left as it was.
  system_tmp = tmp_path / 'system_tmp'
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(system_tmp))
  src = write_dataset(tmp_path / 'idx', n_train=40, n_test=20)
  data.prepare('mnist', str(tmp_path / 'tfds'), str(src), verify_checksums=False)
  assert sorted(p.name for p in system_tmp.iterdir()) == []
  assert tempfile.gettempdir() == str(system_tmp)  # restored for everything else
  # A temp folder that cannot be made is no reason to refuse a dataset that is prepared.
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'gone'))
  builder = data.prepare('mnist', str(tmp_path / 'tfds'), str(src), verify_checksums=False)
  assert builder.is_prepared() and not (tmp_path / 'gone').exists()


def _corrupt(src, name, how):
  path = src / name
  raw = gzip.decompress(path.read_bytes())
  if how == 'truncated_gzip':
    path.write_bytes(path.read_bytes()[:-40])
  elif how == 'truncated_payload':
    path.write_bytes(gzip.compress(raw[:-100]))
  elif how == 'bad_magic':
    path.write_bytes(gzip.compress(b'\x00\x00\x0d\x03' + raw[4:]))
  elif how == 'missing':
    path.unlink()
  elif how == 'not_gzip_garbage':
    path.write_bytes(b'hello, not an idx file')


@pytest.mark.parametrize('name,how,expected', [
    ('train-images-idx3-ubyte.gz', 'truncated_gzip', 'not a readable gzip file'),
    ('train-images-idx3-ubyte.gz', 'truncated_payload', 'truncated'),
    ('t10k-images-idx3-ubyte.gz', 'bad_magic', 'not an IDX file'),
    ('t10k-labels-idx1-ubyte.gz', 'missing', 'missing'),
    ('train-labels-idx1-ubyte.gz', 'not_gzip_garbage', 'not an IDX file'),
])
def test_bad_files_fail_with_one_clear_line_and_prepare_nothing(tmp_path, name, how, expected):
  src = write_dataset(tmp_path / 'idx', n_train=40, n_test=20)
  _corrupt(src, name, how)
  with pytest.raises(UserError) as e:
    data.prepare('mnist', str(tmp_path / 'tfds'), str(src), verify_checksums=False)
  message = str(e.value)
  assert '\n' not in message and expected in message and name.split('.')[0] in message
  assert not (tmp_path / 'tfds' / 'mnist' / '3.0.1').exists()


def test_label_count_mismatch_and_bad_labels(tmp_path):
  src = write_dataset(tmp_path / 'idx', n_train=40, n_test=20)
  write_idx(src / 'train-labels-idx1-ubyte.gz', np.zeros(39, np.uint8))
  with pytest.raises(UserError, match='39 labels for 40 images'):
    data.read_idx_split(str(src), 'train', 'mnist', False)
  write_idx(src / 'train-labels-idx1-ubyte.gz', np.full(40, 12, np.uint8))
  with pytest.raises(UserError, match='label 12 outside'):
    data.read_idx_split(str(src), 'train', 'mnist', False)


def test_uncompressed_idx_files_are_accepted(tmp_path):
  src = tmp_path / 'raw'
  src.mkdir()
  images = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
  write_idx(src / 'train-images-idx3-ubyte', images, compress=False)
  write_idx(src / 'train-labels-idx1-ubyte', np.array([1, 2, 3], np.uint8), compress=False)
  got, labels = data.read_idx_split(str(src), 'train', 'mnist', False)
  np.testing.assert_array_equal(got[..., 0], images)
  assert labels.tolist() == [1, 2, 3]


def test_checksum_pins_reject_modified_mnist(tmp_path):
  src = write_dataset(tmp_path / 'idx', n_train=40, n_test=20)
  with pytest.raises(UserError, match='content differs from the original'):
    data.read_idx_split(str(src), 'test', 'mnist', verify_checksums=True)


def test_missing_manual_dir_names_the_fix(tmp_path):
  with pytest.raises(UserError, match='no such directory'):
    data.prepare('mnist', str(tmp_path / 'tfds'), str(tmp_path / 'nope'))


def test_real_mnist_files_pass_the_pins_and_counts(mnist_dir):
  for split, n, counts in (('train', 60000, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
                           ('test', 10000, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])):
    images, labels = data.read_idx_split(str(mnist_dir), split, 'mnist', verify_checksums=True)
    assert images.shape == (n, 28, 28, 1)
    assert np.bincount(labels).tolist() == counts


def test_holdout_is_seeded_and_disjoint():
  tr, va = data.holdout_indices(1000, 0.1, seed=3)
  assert len(va) == 100 and len(tr) == 900 and not set(tr) & set(va)
  tr2, va2 = data.holdout_indices(1000, 0.1, seed=3)
  assert np.array_equal(va, va2)
  assert not np.array_equal(va, data.holdout_indices(1000, 0.1, seed=4)[1])
  tr3, va3 = data.holdout_indices(1000, 0.1, seed=3, max_examples=200)
  assert len(tr3) == 180 and len(va3) == 20


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
  a = np.asarray(data.epoch_permutation(0, 1, 500))
  assert np.array_equal(a, np.asarray(data.epoch_permutation(0, 1, 500)))
  assert sorted(a.tolist()) == list(range(500))
  assert not np.array_equal(a, np.asarray(data.epoch_permutation(0, 2, 500)))
  assert not np.array_equal(a, np.asarray(data.epoch_permutation(1, 1, 500)))


def test_process_shares_make_up_the_global_batch():
  split = {'image': np.arange(100)[:, None], 'label': np.arange(100)}
  perm = np.random.default_rng(0).permutation(100)
  whole = list(data.host_batches(split, perm, 8))
  assert len(whole) == 12  # the partial batch is dropped
  halves = [list(data.host_batches(split, perm, 8, 0, p, 2)) for p in range(2)]
  for step, batch in enumerate(whole):
    joined = np.concatenate([halves[0][step]['label'], halves[1][step]['label']])
    assert np.array_equal(joined, batch['label'])
  resumed = list(data.host_batches(split, perm, 8, first_step=5))
  assert np.array_equal(resumed[0]['label'], whole[5]['label'])


def test_decoded_cache_matches_tfds_and_follows_the_files(tmp_path):
  src = write_dataset(tmp_path / 'idx', n_train=60, n_test=20, seed=9)
  builder = data.prepare('mnist', str(tmp_path / 'tfds'), str(src), verify_checksums=False)
  first = data.read_split(builder, 'train')
  cache = tmp_path / 'tfds' / 'mnist' / '3.0.1' / 'digitjax-decoded-train.npz'
  assert cache.exists()
  cached = data.read_split(builder, 'train')
  uncached = data.read_split(builder, 'train', cache=False)
  for arrays in (cached, uncached):
    np.testing.assert_array_equal(arrays['image'], first['image'])
    np.testing.assert_array_equal(arrays['label'], first['label'])
  # A damaged cache is ignored and rewritten.
  cache.write_bytes(b'garbage')
  np.testing.assert_array_equal(data.read_split(builder, 'train')['label'], first['label'])
  assert cache.stat().st_size > 1000


def test_the_first_images_come_with_the_data_from_the_start_of_the_idx_files(config, tmp_path):
  # The pictures' first images (the IDX files' own order, which tfds shuffles) are read with
  # the data, once, from the start of the files only: a file cut after them still gives them.
  splits = data.load_splits(config, firsts=True)
  assert data.load_splits(config).firsts is None  # only when asked (eval draws nothing)
  for split in ('train', 'test'):
    images, labels = data.read_idx_split(config.data.manual_dir, split, 'mnist', False)
    assert np.array_equal(splits.firsts[split]['image'], images[:9])
    assert splits.firsts[split]['label'].tolist() == labels[:9].tolist()
  index = splits.firsts['test']['index']
  assert np.array_equal(splits.test['image'][index], splits.firsts['test']['image'])
  with gzip.open(f'{config.data.manual_dir}/train-images-idx3-ubyte.gz', 'rb') as f:
    head = f.read(16 + 9 * 28 * 28)
  cut = tmp_path / 'cut.gz'
  cut.write_bytes(gzip.compress(head + b'\0' * 100))  # the rest of the file is cut off
  assert np.array_equal(data.read_idx_head(str(cut), 3, 9)[..., None],
                        splits.firsts['train']['image'])


def test_real_mnists_first_images_are_the_tutorials(mnist_dir):
  splits = data.Splits({}, {}, {'image': np.zeros((0, 28, 28, 1), np.uint8),
                               'label': np.zeros(0, np.int32)})
  firsts = data.first_images(str(mnist_dir), splits)
  assert firsts['train']['label'].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1]
  assert firsts['test']['label'].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5]
