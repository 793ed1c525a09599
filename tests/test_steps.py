"""The pure step: optimizer and schedules as configured, the numbers a group passes as arrays,
augmentation, dropout and BatchNorm."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from conftest import synthetic_digits
from digitjax import augment, configlib, model as model_lib, steps
from digitjax.errors import UserError


def _digit_batch(n, seed=3):
  images, labels = synthetic_digits(n, seed)
  return {'image': images[..., None], 'label': labels.astype(np.int32)}


def _run(config, n_steps, hp=None, numbers=None, key=0, **create):
  """n_steps of train_step on one fixed batch; `numbers` are passed to the jitted step as
  arrays (as a group's members pass them), the rest stays Python numbers."""
  state, spec, default_hp = steps.create(config, jax.random.key(key), **create)
  hp = hp or default_hp
  batch = _digit_batch(32)
  step = jax.jit(lambda s, b, n: steps.train_step(s, b, hp._replace(**n), spec))
  numbers = {k: jnp.float32(v) for k, v in (numbers or {}).items()}
  for _ in range(n_steps):
    state, metrics = step(state, batch, numbers)
  return state, metrics


def _assert_same_updates(tx, own, steps_=25):
  """`tx` (built by steps.make_optimizer) gives optax's `own` updates, bit for bit."""
  params = {'w': jnp.linspace(-1.0, 1.0, 7)}
  a, b = tx.init(params), own.init(params)
  for i in range(steps_):
    grads = {'w': jnp.sin(params['w'] * (i + 1))}
    ua, a = tx.update(grads, a, params)
    ub, b = own.update(grads, b, params)
    np.testing.assert_array_equal(ua['w'], ub['w'])
  assert float(jnp.abs(ua['w']).max()) > 0  # the updates did something


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------
# Optimizer and schedules


@pytest.mark.parametrize('schedule,expect', [
    ('constant', {0: 0.1, 50: 0.1, 99: 0.1}),
    ('cosine', {0: 0.1, 50: 0.05, 100: 0.0}),
    ('onecycle', {0: 0.1 / 25, 30: 0.1, 100: 0.1 / 25 / 1e4}),
])
def test_schedules_give_the_configured_learning_rates(config, schedule, expect):
  config.learning_rate, config.num_epochs, config.schedule = 0.1, 10, schedule
  spec = steps.spec(config, None, steps_per_epoch=10)
  lr = steps.learning_rate_schedule(spec, steps.hyper(config, 10))
  for step, value in expect.items():
    got = lr(step) if callable(lr) else lr
    assert float(got) == pytest.approx(value, rel=1e-4, abs=1e-9), (schedule, step)


def test_warmup_rises_linearly_then_holds(config):
  config.learning_rate, config.warmup_epochs = 0.2, 1.0
  lr = steps.learning_rate_schedule(steps.spec(config, None, 10), steps.hyper(config, 10))
  assert [round(float(lr(s)), 6) for s in (0, 5, 10, 30)] == [0.0, 0.1, 0.2, 0.2]


@pytest.mark.parametrize('schedule, warmup', [('cosine', 0.5), ('cosine', 0.0),
                                              ('onecycle', 0.0), ('constant', 0.3)])
def test_array_schedules_are_optaxs_curves(config, schedule, warmup):
  # A vmapped group passes peaks, warmups and one-cycle shares as arrays: the same curve.
  config.learning_rate, config.num_epochs, config.schedule = 0.05, 3, schedule
  config.warmup_epochs, config.onecycle_pct_start = warmup, 0.25
  spec = steps.spec(config, None, steps_per_epoch=100)
  hp = steps.hyper(config, 100)
  reference = steps.learning_rate_schedule(spec, hp)
  arrays = steps.learning_rate_schedule(spec, hp._replace(
      learning_rate=jnp.float32(hp.learning_rate), warmup_steps=jnp.float32(hp.warmup_steps),
      onecycle_pct_start=jnp.float32(hp.onecycle_pct_start)))
  counts = jnp.arange(305)
  np.testing.assert_allclose(jax.vmap(arrays)(counts), jax.vmap(reference)(counts), rtol=2e-5,
                             atol=1e-9)


def test_nesterov_weight_decay_and_cosine_warmup_reach_optax_as_configured(config):
  config.nesterov, config.weight_decay, config.momentum = True, 5e-4, 0.8
  config.schedule, config.warmup_epochs, config.learning_rate, config.num_epochs = (
      'cosine', 1.0, 0.05, 4)
  tx = steps.make_optimizer(steps.spec(config, None, 10), steps.hyper(config, 10))
  own = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(
      optax.warmup_cosine_decay_schedule(0.0, 0.05, 10, 40), momentum=0.8, nesterov=True))
  _assert_same_updates(tx, own)


@pytest.mark.parametrize('cooldown', [0, 1])
def test_plateau_rule_scales_by_its_factor_after_its_patience(config, cooldown):
  config.plateau.enabled, config.plateau.patience, config.plateau.factor = True, 2, 0.3
  config.plateau.cooldown, config.momentum = cooldown, 0.0
  tx = steps.make_optimizer(steps.spec(config, None, steps_per_epoch=2),
                            steps.hyper(config, 2))
  params = {'w': jnp.ones(())}
  state = tx.init(params)
  sizes = []
  # Epochs of 2 steps: the loss improves for 2 epochs, then stalls for 4.
  for loss in [1.0, 1.0, 0.5, 0.5] + [0.6] * 8:
    updates, state = tx.update({'w': jnp.ones(())}, state, params, value=jnp.float32(loss))
    sizes.append(float(-updates['w']))
  lr = config.learning_rate
  # Patience 2: epochs 3 and 4 do not improve, so the update that completes epoch 4 (step 7)
  # is the first scaled by the factor; epochs 5 and 6 do not improve either: scaled again,
  # unless a cooldown of one epoch after the first reduction leaves epoch 5 uncounted.
  second = [lr * 0.3 * 0.3] if cooldown == 0 else [lr * 0.3]
  assert sizes == pytest.approx([lr] * 7 + [lr * 0.3] * 4 + second)


@pytest.mark.parametrize('over, numbers', [
    ({}, {'learning_rate': 0.02}),
    pytest.param({'nesterov': True, 'weight_decay': 5e-4},
                 {'momentum': 0.9, 'weight_decay': 5e-4}, marks=pytest.mark.slow),
])
def test_exact_numbers_passed_as_arrays_change_nothing(config, over, numbers):
  # Members of a 'map' group share one compiled step and pass these numbers as arrays; each
  # must then still be its single run, bit for bit.
  for k, v in over.items():
    configlib.set_field(config, k, v)
  spec = steps.spec(config, None, 1)
  assert set(numbers) <= set(steps.exact_numbers(spec))
  static, _ = _run(config, 12)
  passed, _ = _run(config, 12, numbers=numbers)
  assert _same(static.params, passed.params)
  assert _same(static.opt_state, passed.opt_state)


def test_a_schedule_is_not_an_exact_number(config):
  config.schedule = 'cosine'
  assert 'learning_rate' not in steps.exact_numbers(steps.spec(config, None, 1))


# ---------------------------------------------------------------------------------------------
# Augmentation, dropout, BatchNorm


def test_identity_transform_leaves_images_unchanged():
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  same = augment.affine(x, jnp.zeros(4), jnp.ones(4), jnp.zeros((4, 2)))
  assert jnp.array_equal(same, x)
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


def test_augmented_step_is_a_pure_function_of_state_and_batch(config):
  a, _ = _run(config, 1)
  config.augment.enabled = True
  b, _ = _run(config, 1)
  c, _ = _run(config, 1)
  assert _same(b.params, c.params) and not _same(a.params, b.params)


def test_dropout_acts_only_in_training_and_follows_the_key():
  model = model_lib.CNN(dropout_rate=0.5)
  x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
  variables = model.init(jax.random.key(1), x)
  assert model_lib.count_params(variables['params']) == 159_254
  plain = model.apply(variables, x)
  assert jnp.array_equal(plain, model.apply(variables, x, train=False))
  drop = lambda k, **kw: model.apply(variables, x, train=True,
                                     rngs={'dropout': jax.random.key(k)}, **kw)
  assert jnp.array_equal(drop(3), drop(3)) and not jnp.array_equal(drop(3), drop(4))
  assert not jnp.array_equal(drop(3), plain)
  # A rate given at call time (a vmapped member's) as an array: the same masks and scaling,
  # and an array rate of 0 keeps every input.
  np.testing.assert_allclose(drop(3, dropout_rate=jnp.float32(0.5)), drop(3), rtol=1e-6)
  assert jnp.array_equal(drop(3, dropout_rate=jnp.float32(0.0)),
                         model_lib.CNN().apply(variables, x))


def test_batch_norm_normalizes_by_the_whole_batch_and_evaluates_with_running_statistics(config):
  plain, _, _ = steps.create(config, jax.random.key(0))
  # Without BatchNorm the state is the tree it always was: old checkpoints still restore.
  assert {str(path[0]) for path, _ in jax.tree_util.tree_leaves_with_path(plain)} == {
      '.step', '.params', '.opt_state', '.rng'}
  config.model.batch_norm = True
  state, spec, hp = steps.create(config, jax.random.key(0))
  assert set(state.params['conv1']) == {'kernel'}  # BatchNorm's offset replaces the bias
  assert set(state.params['bn1']) == {'scale', 'bias'}
  assert set(state.batch_stats) == {'bn1', 'bn2', 'bn3', 'bn4'}
  batch = _digit_batch(16)
  new, _ = jax.jit(functools.partial(steps.train_step, hp=hp, spec=spec))(state, batch)
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
  half = {k: v[:8] for k, v in batch.items()}
  train_mode = lambda b: spec.model.apply(new.variables(), b['image'] / 255.0, train=True,
                                          mutable=['batch_stats'])[0]
  assert not np.allclose(train_mode(batch)[:8], train_mode(half), atol=1e-3)
  np.testing.assert_allclose(steps.eval_step(new, batch, spec.model)[:8],
                             steps.eval_step(new, half, spec.model), rtol=1e-5, atol=1e-5)


def test_batch_norm_takes_the_gradient_in_one_chunk(config):
  config.model.batch_norm = True
  assert configlib.resolve(config, backend='cpu').grad_chunks == 1
  config.grad_chunks = 2
  with pytest.raises(UserError, match='grad_chunks=2 is invalid: .*batch_norm'):
    configlib.validate(config)


# ---------------------------------------------------------------------------------------------
# Mixed precision and Adam


def test_bfloat16_steps_stay_close_to_float32_steps_and_keep_a_float32_state(config):
  # The CPU's training formulation (im2col, reshape pooling, 2 gradient chunks), from the same
  # parameters, 5 steps on one batch. Each bfloat16 rounding has a relative error <= 2^-9; a
  # gradient passes ~10 of them through the 5 layers, a ReLU or a pooling winner flips near a
  # tie, and momentum carries the differences from step to step: the updates (parameters minus
  # their start) differed by 2-5% (in norm) per layer here, as much as with Flax's own
  # bfloat16 layers (XLA's convolution: 3-6%). 0.1 bounds that; a wrong gradient is off by ~1.
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    state, _, _ = steps.create(config, jax.random.key(0), 'im2col', 'reshape', grad_chunks=2)
    runs[dtype] = (state, *_run(config, 5, conv_impl='im2col', pool_impl='reshape',
                                grad_chunks=2))
  (start, f32, f32_metrics), (start_b, bf16, bf16_metrics) = runs['float32'], runs['bfloat16']
  assert _same(start.params, start_b.params)
  for leaf in jax.tree.leaves(bf16):  # parameters, optimizer state: float32 (and integers)
    assert leaf.dtype in (jnp.float32, jnp.int32, jnp.uint32), leaf.dtype
  for key, value in bf16_metrics.items():
    assert value.dtype == jnp.float32, key
  assert float(bf16_metrics['loss']) == pytest.approx(float(f32_metrics['loss']), rel=0.01)
  for (path, a), b, p0 in zip(jax.tree_util.tree_leaves_with_path(f32.params),
                              jax.tree.leaves(bf16.params), jax.tree.leaves(start.params)):
    update_f32, update_bf16 = a - p0, b - p0
    error = float(jnp.linalg.norm(update_bf16 - update_f32) / jnp.linalg.norm(update_f32))
    assert error < 0.1, (jax.tree_util.keystr(path), error)


def test_adam_is_optax_adam_with_the_configured_betas(config):
  config.optimizer, config.adam_b1, config.adam_b2 = 'adam', 0.7, 0.9
  config.schedule, config.learning_rate, config.num_epochs = 'onecycle', 0.01, 3
  tx = steps.make_optimizer(steps.spec(config, None, 10), steps.hyper(config, 10))
  own = optax.adam(optax.cosine_onecycle_schedule(30, 0.01, pct_start=0.3), b1=0.7, b2=0.9)
  _assert_same_updates(tx, own)


@pytest.mark.slow
def test_adams_numbers_passed_as_arrays_change_nothing(config):
  # 'map' groups pass exact_numbers as arrays: with Adam too, each member is its single run.
  config.optimizer, config.weight_decay = 'adam', 5e-4
  assert {'learning_rate', 'weight_decay'} <= set(
      steps.exact_numbers(steps.spec(config, None, 1)))
  static, _ = _run(config, 6)
  passed, _ = _run(config, 6, numbers={'learning_rate': config.learning_rate,
                                      'weight_decay': 5e-4})
  assert _same(static.params, passed.params) and _same(static.opt_state, passed.opt_state)
