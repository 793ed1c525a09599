"""Elastic distortion, stroke-width changes and label smoothing: what each does to images and
losses, that each keeps shapes and labels, and that each switched off changes nothing (not even
the other augmentations' random keys)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage

from conftest import synthetic_digits
from digitjax import augment, configlib, steps
from digitjax.errors import UserError


def _digits(n=8, seed=3):
  images, _ = synthetic_digits(n, seed)
  return jnp.asarray(images[..., None], jnp.float32) / 255.0


def _batch(n=32, seed=3):
  images, labels = synthetic_digits(n, seed)
  return {'image': images[..., None], 'label': labels.astype(np.int32)}


def _step(config, key=0):
  """One jitted train_step of `config` on a fixed batch: (state, metrics)."""
  state, spec, hp = steps.create(config, jax.random.key(key))
  return jax.jit(functools.partial(steps.train_step, hp=hp, spec=spec))(state, _batch())


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------
# Elastic distortion


def test_gaussian_matrix_blurs_as_scipy_does():
  field = np.random.default_rng(0).uniform(-1, 1, (28, 28)).astype(np.float32)
  g = augment.gaussian_matrix(28, 4.0)
  ours = g @ field @ g.T
  theirs = scipy.ndimage.gaussian_filter(field.astype(np.float64), 4.0, mode='constant',
                                         truncate=20.0)
  np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_elastic_field_is_smooth_and_deterministic_for_a_key():
  a = augment.smooth_field(jax.random.key(1), 4, 28, 4.0)
  assert a.shape == (4, 28, 28, 2) and a.dtype == jnp.float32
  assert jnp.array_equal(a, augment.smooth_field(jax.random.key(1), 4, 28, 4.0))
  assert not jnp.array_equal(a, augment.smooth_field(jax.random.key(2), 4, 28, 4.0))
  # Smooth: neighbouring pixels' displacements differ far less than the displacements are
  # large (in uniform noise, the differences are larger than the values).
  roughness = lambda f, axis: float(jnp.abs(jnp.diff(f, axis=axis)).mean() / jnp.abs(f).mean())
  assert roughness(a, 1) < 0.25 and roughness(a, 2) < 0.25
  noise = jax.random.uniform(jax.random.key(1), (4, 28, 28, 2), minval=-1.0, maxval=1.0)
  assert roughness(noise, 1) > 1.0 and roughness(noise, 2) > 1.0


def test_elastic_keeps_shape_and_dtype_and_zero_alpha_is_the_identity():
  x = _digits()
  warped = augment.random_elastic(jax.random.key(0), x, 34.0, 4.0)
  assert warped.shape == x.shape and warped.dtype == x.dtype
  assert not jnp.array_equal(warped, x)
  assert float(warped.min()) >= 0.0 and float(warped.max()) <= 1.0  # bilinear: no overshoot
  assert jnp.array_equal(augment.random_elastic(jax.random.key(0), x, 0.0, 4.0), x)
  assert jnp.array_equal(augment.random_elastic(jax.random.key(0), x, 34.0, 4.0), warped)


def test_a_constant_displacement_shifts_the_image():
  image = jnp.zeros((1, 28, 28, 1)).at[0, 10, 12, 0].set(1.0)
  field = jnp.broadcast_to(jnp.array([2.0, -3.0]), (1, 28, 28, 2))
  moved = augment.displace(image, field)  # output p takes the input at p + (2, -3)
  assert np.argwhere(np.asarray(moved[0, ..., 0]) > 0.99).tolist() == [[8, 15]]


# ---------------------------------------------------------------------------------------------
# Stroke width


def test_dilation_only_increases_and_erosion_only_decreases_pixels():
  x = _digits()
  thick, thin = augment.dilate(x), augment.erode(x)
  assert thick.shape == thin.shape == x.shape and thick.dtype == thin.dtype == x.dtype
  assert bool(jnp.all(thick >= x)) and bool(jnp.all(thin <= x))
  assert float(thick.sum()) > float(x.sum()) > float(thin.sum())
  # An opening (erosion, then dilation) never adds ink: the two are adjoint.
  assert bool(jnp.all(augment.dilate(thin) <= x))


def test_a_stroke_gets_one_pixel_thicker_or_thinner():
  bar = jnp.zeros((1, 28, 28, 1)).at[0, 5:20, 10:13, 0].set(1.0)  # 3 pixels wide
  width = lambda im: int((np.asarray(im[0, 12, :, 0]) > 0.5).sum())
  assert (width(augment.dilate(bar)), width(bar), width(augment.erode(bar))) == (4, 3, 2)


def test_random_stroke_picks_per_image_and_zero_probability_is_the_identity():
  x = _digits(64)
  assert jnp.array_equal(augment.random_stroke(jax.random.key(0), x, 0.0), x)
  out = augment.random_stroke(jax.random.key(0), x, 0.5)
  assert out.shape == x.shape and out.dtype == x.dtype
  thick = [bool(jnp.array_equal(o, d)) for o, d in zip(out, augment.dilate(x))]
  thin = [bool(jnp.array_equal(o, e)) for o, e in zip(out, augment.erode(x))]
  assert all(a or b for a, b in zip(thick, thin)) and 10 < sum(thick) < 54
  some = augment.random_stroke(jax.random.key(0), x, 0.2)
  unchanged = sum(bool(jnp.array_equal(o, i)) for o, i in zip(some, x))
  assert 20 < unchanged < 60
  assert jnp.array_equal(some, augment.random_stroke(jax.random.key(0), x, 0.2))


# ---------------------------------------------------------------------------------------------
# In the step


@pytest.mark.parametrize('field,value', [  # elastic's own fast tests: shape, smoothness, key
    pytest.param('augment.elastic_alpha', 34.0, marks=pytest.mark.slow), ('augment.stroke', 0.3)])
def test_each_augmentation_keeps_labels_and_shapes_and_follows_the_key(config, field, value):
  state, spec, hp = steps.create(config, jax.random.key(0))
  configlib.set_field(config, field, value)
  on_spec, on_hp = steps.spec(config, spec.model, 1), steps.hyper(config, 1)
  images = steps._images(_batch())
  key = jax.random.key(7)
  plain = steps.augmented(key, images, hp, spec)
  assert jnp.array_equal(plain, images)
  out = jax.jit(functools.partial(steps.augmented, hp=on_hp, spec=on_spec))(key, images)
  assert out.shape == images.shape and out.dtype == images.dtype
  assert not jnp.array_equal(out, images)
  again = jax.jit(functools.partial(steps.augmented, hp=on_hp, spec=on_spec))(key, images)
  assert jnp.array_equal(out, again)
  # Labels pass the step untouched: the metrics count them as they are.
  batch = _batch()
  new, metrics = jax.jit(functools.partial(steps.train_step, hp=on_hp, spec=on_spec))(state,
                                                                                       batch)
  assert np.isfinite(float(metrics['loss'])) and int(new.step) == 1
  assert np.array_equal(batch['label'], _batch()['label'])


def test_new_fields_at_their_defaults_leave_the_affine_step_as_it_was(config):
  """Off, elastic and stroke draw no keys: the affine's transforms are those it always drew."""
  config.augment.enabled = True
  state, spec, hp = steps.create(config, jax.random.key(0))
  assert not spec.elastic and not spec.stroke and hp.label_smoothing == 0.0
  images = steps._images(_batch())
  key = jax.random.key(3)
  ranges = augment.AffineRanges(hp.rotation, hp.zoom, hp.shift)
  assert jnp.array_equal(steps.augmented(key, images, hp, spec),
                         augment.random_affine(jax.random.fold_in(key, 0), images, ranges))
  # ... and with both on, the affine still draws from fold_in(key, 0) (the others from 2, 3).
  config.augment.elastic_alpha, config.augment.stroke = 34.0, 0.25
  on_spec, on_hp = steps.spec(config, spec.model, 1), steps.hyper(config, 1)
  expected = augment.random_affine(
      jax.random.fold_in(key, 0),
      augment.random_elastic(jax.random.fold_in(key, 2),
                             augment.random_stroke(jax.random.fold_in(key, 3), images, 0.25),
                             34.0, 4.0), ranges)
  np.testing.assert_allclose(steps.augmented(key, images, on_hp, on_spec), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Label smoothing


def test_label_smoothing_is_optax_s_and_zero_is_the_plain_loss():
  logits = jax.random.normal(jax.random.key(0), (6, 10))
  labels = jnp.array([0, 1, 2, 3, 9, 5])
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  assert jnp.array_equal(steps.training_loss(logits, labels, 0.0), plain)
  smooth = steps.training_loss(logits, labels, 0.1)
  logp = jax.nn.log_softmax(logits)
  expected = -(0.9 * logp[jnp.arange(6), labels] + 0.01 * logp.sum(-1))
  np.testing.assert_allclose(smooth, expected, rtol=1e-6)
  # As an array (a vmapped member's or a searched number): the same loss, 0 included.
  np.testing.assert_allclose(steps.training_loss(logits, labels, jnp.float32(0.1)), smooth,
                             rtol=1e-6)
  np.testing.assert_allclose(steps.training_loss(logits, labels, jnp.float32(0.0)), plain,
                             rtol=1e-6)


def test_label_smoothing_changes_the_training_loss_only(config):
  plain_state, plain = _step(config)
  config.label_smoothing = 0.1
  state, smoothed = _step(config)
  assert float(smoothed['loss']) > float(plain['loss'])
  assert float(smoothed['accuracy']) == float(plain['accuracy'])  # same forward pass
  assert not _same(state.params, plain_state.params)


def test_label_smoothing_passed_as_an_array_trains_as_the_number_does(config):
  """A vmapped group's or a search's label smoothing is an array in the step."""
  config.label_smoothing = 0.1
  state, spec, hp = steps.create(config, jax.random.key(0))
  step = jax.jit(lambda s, b, n: steps.train_step(s, b, hp._replace(**n), spec))
  number, m_number = step(state, _batch(), {})
  array, m_array = step(state, _batch(), {'label_smoothing': jnp.float32(0.1)})
  np.testing.assert_allclose(m_array['loss'], m_number['loss'], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(array.params), jax.tree.leaves(number.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize('field,value,message', [
    ('augment.elastic_alpha', -1.0, 'augment.elastic_alpha=-1.0 is invalid: it must be 0'),
    ('augment.elastic_sigma', 0.0, r'augment.elastic_sigma=0.0 is invalid: it must be in \(0, '
                                   r'28\]'),
    ('augment.stroke', 0.6, r'augment.stroke=0.6 is invalid: it must be a probability in '
                            r'\[0, 0.5\]'),
    ('label_smoothing', 1.0, r'label_smoothing=1.0 is invalid: it must be in \[0, 1\)'),
])
def test_bad_values_are_one_line_naming_the_field(config, field, value, message):
  configlib.set_field(config, field, value)
  with pytest.raises(UserError, match=message) as e:
    configlib.validate(config)
  assert '\n' not in str(e.value)


def test_old_stored_configs_get_the_new_fields_at_values_that_change_nothing():
  record = {'augment': {'enabled': True, 'rotation': 10.0, 'zoom': 0.1, 'shift': 0.1}}
  configlib.with_added_fields(record)
  assert record['label_smoothing'] == 0.0
  assert record['augment'] == {'enabled': True, 'rotation': 10.0, 'zoom': 0.1, 'shift': 0.1,
                               'elastic_alpha': 0.0, 'elastic_sigma': 4.0, 'stroke': 0.0}
