"""The two input paths: same batches in the same order, same training result."""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import synthetic_digits

from digitjax import data, parallel, pipeline, steps


def _split(n=200):
  images, labels = synthetic_digits(n, seed=3)
  return {'image': images[..., None], 'label': labels.astype(np.int32)}


def _feeder(kind, split, batch_size, mesh, step_fn, chunk_steps):
  if kind == 'device':
    return pipeline.DeviceInput(pipeline.place(split, mesh), batch_size, mesh, step_fn,
                                chunk_steps)
  return pipeline.HostInput(split, batch_size, mesh, step_fn)


def _record_batches(state, log, batch, numbers):
  """A probe step: writes each batch's labels and per-row pixel sums into row `log['k']`."""
  k = log['k']
  pixels = batch['image'].astype(jnp.int32).sum(axis=(1, 2, 3))
  log = {'k': k + 1,
         'labels': jax.lax.dynamic_update_index_in_dim(log['labels'], batch['label'], k, 0),
         'pixels': jax.lax.dynamic_update_index_in_dim(log['pixels'], pixels, k, 0)}
  return state + 1, log


def _batches_seen(kind, split, batch_size, first_step=0, chunk_steps=4):
  mesh = parallel.make_mesh()
  steps = len(split['label']) // batch_size
  log = {'k': jnp.int32(0), 'labels': jnp.zeros((steps, batch_size), jnp.int32),
         'pixels': jnp.zeros((steps, batch_size), jnp.int32)}
  state = jnp.int32(0)
  feeder = _feeder(kind, split, batch_size, mesh, _record_batches, chunk_steps)
  feeder.compile(state, log, {})
  done = []
  for state, log, step in feeder.run(state, log, data.epoch_permutation(7, 2, len(split['label'])),
                                     first_step, steps, {}):
    done.append(step)
  log = jax.device_get(log)
  return int(state), done, log['labels'][:int(log['k'])], log['pixels'][:int(log['k'])]


def test_device_and_host_paths_feed_identical_batches_in_order():
  split = _split()
  n_host, _, labels_host, pixels_host = _batches_seen('tfds', split, 16)
  n_dev, done_dev, labels_dev, pixels_dev = _batches_seen('device', split, 16, chunk_steps=5)
  assert n_host == n_dev == 12  # 200 // 16 steps; the masked tail of the last chunk runs nothing
  assert done_dev == [5, 10, 12]
  np.testing.assert_array_equal(labels_dev, labels_host)
  np.testing.assert_array_equal(pixels_dev, pixels_host)
  # ...and they are the epoch's permutation, batch after batch.
  perm = np.asarray(data.epoch_permutation(7, 2, 200))
  np.testing.assert_array_equal(labels_host.ravel(), split['label'][perm[:192]])


def test_device_path_resumes_mid_epoch_on_the_same_batches():
  split = _split()
  _, _, labels_all, _ = _batches_seen('device', split, 16, chunk_steps=5)
  _, done, labels_rest, _ = _batches_seen('device', split, 16, first_step=7, chunk_steps=5)
  assert done == [12]
  np.testing.assert_array_equal(labels_rest, labels_all[7:])


def test_scan_and_per_step_paths_reach_the_same_parameters(config):
  split = _split(160)
  mesh = parallel.make_mesh()
  results = {}
  for kind in ('tfds', 'device'):
    state, spec, hp = steps.create(config, jax.random.key(0))
    sums = steps.empty_sums()
    step_fn = lambda s, m, b, n: steps.train_and_accumulate(s, m, b, hp, spec)
    feeder = _feeder(kind, split, 16, mesh, step_fn, 4)
    feeder.compile(state, sums, {})
    for state, sums, _ in feeder.run(state, sums, data.epoch_permutation(0, 0, 160), 0, 10, {}):
      pass
    results[kind] = (state, steps.read_sums(sums))
  (s_host, m_host), (s_dev, m_dev) = results['tfds'], results['device']
  assert int(s_host.step) == int(s_dev.step) == 10
  for a, b in zip(jax.tree.leaves(s_host.params), jax.tree.leaves(s_dev.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert abs(m_host['loss'] - m_dev['loss']) < 1e-4
