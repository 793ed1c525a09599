"""Beyond the tutorial: augmentation, learning-rate schedules, dropout, BatchNorm."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from conftest import small_config, synthetic_digits
from digitjax import augment, configlib, evaluate, model as model_lib, train
from digitjax.errors import UserError


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


def _digit_batch(n, seed=3):
  images, labels = synthetic_digits(n, seed)
  return {'image': images[..., None], 'label': labels.astype(np.int32)}


def test_batch_norm_normalizes_by_the_whole_batch_and_evaluates_with_running_statistics(config):
  plain = train.create_train_state(config, jax.random.key(0))
  # Without BatchNorm the state is the tree it always was: old checkpoints still restore.
  assert {str(path[0]) for path, _ in jax.tree_util.tree_leaves_with_path(plain)} == {
      '.step', '.params', '.opt_state', '.rng'}
  config.model.batch_norm = True
  state = train.create_train_state(config, jax.random.key(0))
  assert set(state.params['conv1']) == {'kernel'}  # BatchNorm's offset replaces the bias
  assert set(state.params['bn1']) == {'scale', 'bias'}
  assert set(state.batch_stats) == {'bn1', 'bn2', 'bn3', 'bn4'}
  batch = _digit_batch(16)
  new, _ = jax.jit(train.train_step)(state, batch)
  # conv1's statistics over all 16 x 26 x 26 positions (rows no output sees included), moved
  # from their initial 0 and 1 by Keras's momentum 0.99.
  x = batch['image'].astype(np.float32) / 255.0
  y = lax.conv_general_dilated(x, state.params['conv1']['kernel'], (1, 1), 'VALID',
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(new.batch_stats['bn1']['mean'], 0.01 * y.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(new.batch_stats['bn1']['var'], 0.99 + 0.01 * y.var(axis=(0, 1, 2)),
                             rtol=1e-4)
  # Training normalizes each batch by its own statistics; evaluation by the running ones, so an
  # image's logits then do not depend on the other images of its batch.
  model = model_lib.build_model(config.model)
  half = {k: v[:8] for k, v in batch.items()}
  train_mode = lambda b: model.apply(new.variables(), b['image'] / 255.0, train=True,
                                     mutable=['batch_stats'])[0]
  assert not np.allclose(train_mode(batch)[:8], train_mode(half), atol=1e-3)
  np.testing.assert_allclose(train.eval_step(new, batch)[:8], train.eval_step(new, half),
                             rtol=1e-5, atol=1e-5)


def test_batch_norm_takes_the_gradient_in_one_chunk(config):
  config.model.batch_norm = True
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  assert train.resolve_grad_chunks(config, mesh) == 1
  config.grad_chunks = 2
  with pytest.raises(UserError, match='grad_chunks=2 is invalid: .*batch_norm'):
    configlib.validate(config)


@pytest.mark.parametrize('ensemble_size', [1, 2])
def test_batch_norm_runs_resume_exactly_and_evaluate_with_their_statistics(
    idx_dir, tfds_dir, tmp_path, ensemble_size):
  make = lambda epochs: small_config(idx_dir, tfds_dir, num_epochs=epochs,
                                     ensemble_size=ensemble_size, **{'model.batch_norm': True})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(make(1), workdir)
  resumed = train.train_and_evaluate(make(2), workdir)
  straight = train.train_and_evaluate(make(2), str(tmp_path / 'straight'))
  for a, b in zip(jax.tree.leaves((resumed.params, resumed.batch_stats)),
                  jax.tree.leaves((straight.params, straight.batch_stats))):
    np.testing.assert_array_equal(a, b)
  stats = jax.tree.leaves(resumed.batch_stats)  # mean and var of 4 BatchNorm layers
  assert len(stats) == 8 and all(s.ndim == (1 if ensemble_size == 1 else 2) for s in stats)
  # --mode=eval restores the statistics along with the parameters: the same numbers again.
  with open(tmp_path / 'run' / 'results.json') as f:
    results = json.load(f)
  assert results['test_accuracy'] > 0.5
  assert evaluate.run_eval(make(2), workdir, 'latest', 'test')['test_loss'] == results['test_loss']
