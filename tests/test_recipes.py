"""Beyond the tutorial: augmentation, learning-rate schedules, dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import small_config
from digitjax import augment, model as model_lib, train


def test_identity_transform_leaves_images_unchanged():
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  same = augment.affine(x, jnp.zeros(4), jnp.ones(4), jnp.zeros((4, 2)))
  assert jnp.array_equal(same, x)
  # Zero ranges draw the identity too.
  none = augment.random_affine(jax.random.key(1), x, augment.AffineRanges(0.0, 0.0, 0.0))
  assert jnp.array_equal(none, x)


def test_known_rotation_and_shift_move_a_known_pixel():
  image = jnp.zeros((1, 28, 28, 1)).at[0, 5, 20, 0].set(1.0)
  turned = augment.affine(image, jnp.array([jnp.pi / 2]), jnp.ones(1), jnp.zeros((1, 2)))
  # 90 degrees counter-clockwise about (13.5, 13.5): row 5, column 20 -> row 7, column 5.
  assert np.argwhere(np.asarray(turned[0, ..., 0]) > 0.99).tolist() == [[7, 5]]
  moved = augment.affine(image, jnp.zeros(1), jnp.ones(1), jnp.array([[2.0, -3.0]]))
  assert np.argwhere(np.asarray(moved[0, ..., 0]) > 0.99).tolist() == [[7, 17]]
  near = jnp.zeros((1, 28, 28, 1)).at[0, 12, 15, 0].set(1.0)
  zoomed = augment.affine(near, jnp.zeros(1), jnp.array([2.0]), jnp.zeros((1, 2)))
  # 2x about (13.5, 13.5): (12, 15) -> (10.5, 16.5), spread by bilinear sampling.
  rows, cols = np.nonzero(np.asarray(zoomed[0, ..., 0]) > 0.2)
  assert set(rows) == {10, 11} and set(cols) == {16, 17}
  assert float(zoomed.sum()) == pytest.approx(4.0, rel=0.05)  # twice as tall and wide


def test_random_affine_is_deterministic_for_a_key_and_varies_across_keys():
  x = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
  ranges = augment.AffineRanges()
  a = augment.random_affine(jax.random.key(5), x, ranges)
  assert jnp.array_equal(a, augment.random_affine(jax.random.key(5), x, ranges))
  assert not jnp.array_equal(a, augment.random_affine(jax.random.key(6), x, ranges))
  assert not jnp.array_equal(a, x)


@pytest.mark.parametrize('schedule,expect', [
    ('constant', {0: 0.1, 50: 0.1, 99: 0.1}),
    ('cosine', {0: 0.1, 50: 0.05, 100: 0.0}),
    ('onecycle', {0: 0.1 / 25, 30: 0.1, 100: 0.1 / 25 / 1e4}),
])
def test_schedules_give_the_configured_learning_rates(config, schedule, expect):
  config.learning_rate, config.num_epochs, config.schedule = 0.1, 10, schedule
  lr = train.learning_rate_schedule(config, steps_per_epoch=10)
  for step, value in expect.items():
    got = lr(step) if callable(lr) else lr
    assert float(got) == pytest.approx(value, rel=1e-4, abs=1e-9), (schedule, step)


def test_warmup_rises_linearly_then_holds(config):
  config.learning_rate, config.warmup_epochs = 0.2, 1.0
  lr = train.learning_rate_schedule(config, steps_per_epoch=10)
  assert [round(float(lr(s)), 6) for s in (0, 5, 10, 30)] == [0.0, 0.1, 0.2, 0.2]


def test_plateau_rule_lowers_the_step_after_patience_epochs(config):
  config.plateau.enabled, config.plateau.patience, config.plateau.factor = True, 1, 0.5
  config.momentum = 0.0
  tx = train.make_optimizer(config, steps_per_epoch=2)
  params = {'w': jnp.ones(())}
  state = tx.init(params)
  sizes = []
  for loss in [1.0, 1.0, 0.5, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]:  # improves, then stalls
    updates, state = tx.update({'w': jnp.ones(())}, state, params, value=jnp.float32(loss))
    sizes.append(float(-updates['w']))
  assert sizes[0] == pytest.approx(config.learning_rate)
  assert sizes[-1] < sizes[0]


def test_dropout_acts_only_in_training_and_follows_the_key():
  model = model_lib.CNN(dropout_rate=0.5)
  x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
  variables = model.init(jax.random.key(1), x)
  assert model_lib.count_params(variables['params']) == 159_254
  plain = model.apply(variables, x)
  assert jnp.array_equal(plain, model.apply(variables, x, train=False))
  drop = lambda k: model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(k)})
  assert jnp.array_equal(drop(3), drop(3)) and not jnp.array_equal(drop(3), drop(4))
  assert not jnp.array_equal(drop(3), plain)


def test_augmented_training_step_is_a_pure_function_of_state_and_batch(config):
  config.augment.enabled = True
  state = train.create_train_state(config, jax.random.key(0))
  batch = {'image': np.random.default_rng(0).integers(0, 255, (8, 28, 28, 1)).astype(np.uint8),
           'label': np.arange(8, dtype=np.int32)}
  step = jax.jit(lambda s, b: train.train_step(s, b, train.augment_ranges(config)))
  a, _ = step(state, batch)
  b, _ = step(state, batch)
  plain, _ = jax.jit(train.train_step)(state, batch)
  for x, y, z in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params),
                     jax.tree.leaves(plain.params)):
    assert np.array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(jax.tree.leaves(a.params),
                                                        jax.tree.leaves(plain.params)))
