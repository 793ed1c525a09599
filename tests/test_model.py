import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import synthetic_digits
from digitjax import configlib, inference, model as model_lib, parallel, steps
from digitjax.errors import UserError


def test_parameter_count_and_output_shape():
  model = model_lib.CNN()
  variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
  assert model_lib.count_params(variables['params']) == 159_254
  assert model.apply(variables, jnp.zeros((5, 28, 28, 1))).shape == (5, 10)
  shapes = jax.tree.map(jnp.shape, variables['params'])
  assert shapes['conv1']['kernel'] == (3, 3, 1, 32)
  assert shapes['dense1']['kernel'] == (1024, 100)


def test_summary_table_lists_layers_and_total():
  table = model_lib.summary_table(model_lib.CNN())
  assert 'conv1 (Conv)' in table and '(None, 26, 26, 32)' in table
  assert 'dense1 (Dense)' in table and '102,500' in table
  assert table.rstrip().endswith('Total params: 159,254')


# The CPU's training formulation in the fast tier; 'mixed' (im2col's variant) and the others in
# the slow one.
FORMULATIONS = [('im2col', 'reshape'),
                *[pytest.param(*f, marks=pytest.mark.slow) for f in (
                    ('mixed', 'reshape'), ('lax', 'lax'), ('im2col', 'lax'), ('lax', 'reshape'),
                    ('winograd', 'lax'), ('lax,winograd,winograd', 'reshape'))]]


@pytest.mark.parametrize('conv_impl,pool_impl', FORMULATIONS)
@pytest.mark.parametrize('inputs', ['uniform', 'digits'])
def test_fast_layers_match_reference_outputs_and_gradients(conv_impl, pool_impl, inputs):
  # The reference is the plain Keras-shaped network: nn.Conv, nn.max_pool, every row computed.
  reference = model_lib.CNN(conv_impl='lax', pool_impl='lax', skip_dead_rows=False)
  fast = model_lib.CNN(conv_impl=conv_impl, pool_impl=pool_impl)
  params = reference.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))['params']
  if inputs == 'uniform':  # no two pixels alike: no tied maxima in any pooling window
    x = jax.random.uniform(jax.random.key(2), (8, 28, 28, 1))
  else:
    # Digits on a black background, and positive biases (as training makes them): a blank
    # region is constant after each conv, so every input of its pooling windows is a tied
    # maximum, and the biases' gradients depend on where the pooling sends them.
    images, _ = synthetic_digits(8, seed=3)
    images = np.where(images > 200, images, 0)
    x = jnp.asarray(images[..., None] / 255.0, jnp.float32)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.05 if path[-1].key == 'bias' else p, params)
  y = jnp.arange(8) % 10

  def loss(m, p):
    return optax.softmax_cross_entropy_with_integer_labels(m.apply({'params': p}, x), y).mean()

  # Same parameter names and shapes: checkpoints are interchangeable.
  fast_params = jax.eval_shape(fast.init, jax.random.key(1), jnp.zeros((1, 28, 28, 1)))['params']
  assert jax.tree.structure(fast_params) == jax.tree.structure(params)
  apply = lambda m: jax.jit(lambda p: m.apply({'params': p}, x))
  np.testing.assert_allclose(apply(fast)(params), apply(reference)(params), rtol=1e-5,
                             atol=1e-5)
  g_ref = jax.jit(jax.grad(lambda p: loss(reference, p)))(params)
  g_fast = jax.jit(jax.grad(lambda p: loss(fast, p)))(params)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_reshape_pooling_sends_a_tied_windows_gradient_to_its_first_maximum():
  # As select_and_scatter does: one input per window gets g, the first in row-major order.
  x = jnp.array([[1., 1., 0., 2.], [1., 1., 2., 2.], [5., 3., 4., 4.], [0., 5., 4., 4.]])
  x = x[None, :, :, None]
  grad = lambda impl: jax.grad(lambda x: model_lib.max_pool_2x2(x, impl).sum())(x)[0, :, :, 0]
  expected = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(grad('reshape'), expected)
  np.testing.assert_array_equal(grad('lax'), expected)


def test_used_input_size_drops_only_rows_no_output_sees():
  assert model_lib.used_input_size(28, 3, (0, 2)) == 26
  assert model_lib.used_input_size(30, 3, (0, 2)) == 30  # 28 -> 14 -> 12 -> 10 -> 5: all used
  assert model_lib.used_input_size(28, 1, ()) == 28


def test_im2col_conv_falls_back_for_other_convolutions():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ('NHWC', 'HWIO', 'NHWC'))
  expected = jax.lax.conv_general_dilated(x, k, (2, 2), 'SAME', dimension_numbers=dn)
  got = model_lib.im2col_conv(x, k, (2, 2), 'SAME', dimension_numbers=dn)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_patch_matmul_gradients_are_the_plain_products_gradients():
  # im2col's matmul computes its kernel gradient as (dy^T . patches)^T: the same sums as JAX's
  # patches^T . dy, in another order, so equal up to float32 rounding, jitted or not.
  keys = jax.random.split(jax.random.key(0), 3)
  patches = jax.random.normal(keys[0], (4, 5, 5, 18))
  kernel = jax.random.normal(keys[1], (18, 7))
  dy = jax.random.normal(keys[2], (4, 5, 5, 7))
  expected_out, expected_vjp = jax.vjp(jnp.dot, patches, kernel)
  for fn in (model_lib._patch_matmul, jax.jit(model_lib._patch_matmul)):
    out, vjp = jax.vjp(fn, patches, kernel)
    np.testing.assert_array_equal(out, expected_out)
    for got, expected in zip(vjp(dy), expected_vjp(dy)):
      assert got.shape == expected.shape
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_train_step_lowers_loss_on_a_fixed_batch(config):
  state, spec, hp = steps.create(config, jax.random.key(0))
  images, labels = synthetic_digits(32, seed=0)
  batch = {'image': images[..., None], 'label': labels.astype(np.int32)}
  step = jax.jit(functools.partial(steps.train_step, hp=hp, spec=spec), donate_argnums=0)
  state, first = step(state, batch)
  for _ in range(20):
    state, metrics = step(state, batch)
  assert int(state.step) == 21
  assert float(metrics['loss']) < 0.25 * float(first['loss'])


def test_mixed_conv_uses_xla_for_single_channel_input_only():
  x = jnp.zeros((1, 28, 28, 1))
  model = model_lib.CNN(conv_impl='mixed')
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({'params': p}, x))(
      model.init(jax.random.key(0), x)['params']))
  assert jaxpr.count('conv_general_dilated') == 1  # conv1; conv2 and conv3 are matmuls
  assert jaxpr.count('concatenate') == 2


@pytest.mark.slow
def test_winograd_conv_matches_xla_for_odd_sizes_and_falls_back_for_others():
  # Odd output sizes (13 -> 11) pad a zero row and column; 5x5 kernels and strides go to im2col
  # or XLA. Random weights and inputs of scale 1: outputs of scale ~17.
  for x_shape, k_shape, strides in (((3, 13, 12, 32), (3, 3, 32, 16), (1, 1)),
                                    ((2, 9, 9, 4), (5, 5, 4, 3), (1, 1)),
                                    ((2, 9, 9, 4), (3, 3, 4, 3), (2, 2))):
    x = jax.random.normal(jax.random.key(0), x_shape)
    k = jax.random.normal(jax.random.key(1), k_shape)
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ('NHWC', 'HWIO', 'NHWC'))
    want = jax.lax.conv_general_dilated(x, k, strides, 'VALID', dimension_numbers=dn)
    got = model_lib.winograd_conv(x, k, strides, 'VALID', dimension_numbers=dn)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('conv_impl', ['winograd,lax', 'lax,fft,lax', 'mixed,lax,lax'])
def test_conv_impl_names_are_checked(config, conv_impl):
  config.model.conv_impl = conv_impl
  with pytest.raises(UserError, match='model.conv_impl'):
    configlib.validate(config)


def test_evaluator_gives_the_training_models_logits(config):
  # The evaluator runs the inference formulation (XLA's layers) on the training state's
  # parameters: the logits are those of the training formulation (im2col, reshape pooling).
  mesh = parallel.make_mesh()
  images = synthetic_digits(70, seed=3)[0][..., None]
  evaluator = inference.Evaluator.for_config(config, mesh)
  for seed in (0, 1):
    state, spec, _ = steps.create(config, jax.random.key(seed), 'im2col', 'reshape')
    expected = spec.model.apply({'params': state.params}, images.astype(np.float32) / 255.0)
    np.testing.assert_allclose(evaluator.logits(state, images), expected, rtol=1e-5, atol=1e-5)
  # A split smaller than eval_batch_size is not padded up to it; a larger one is batched
  # (70 = 32 + 32 + 6, the last batch padded): each image keeps its own logits, those of the
  # whole split in one program and of the model's own apply.
  whole = inference.Evaluator(mesh, 10**6, spec.model).logits(state, images)
  batched = inference.Evaluator(mesh, 32, spec.model).logits(state, images)
  assert whole.shape == batched.shape == (70, 10)
  assert not np.allclose(batched[:32], batched[32:64])  # different images, different logits
  np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batched, expected, rtol=1e-5, atol=1e-5)


def test_gradient_in_chunks_equals_whole_batch_gradient(config):
  # Two sub-batches whose gradients are summed: the same step as one batch, up to rounding.
  images, labels = synthetic_digits(32, seed=3)
  batch = {'image': images[..., None], 'label': labels.astype(np.int32)}
  results = {}
  for chunks in (1, 2, 4):
    state, spec, hp = steps.create(config, jax.random.key(0), grad_chunks=chunks)
    step = jax.jit(functools.partial(steps.train_step, hp=hp, spec=spec))
    s, m = state, None
    for _ in range(3):
      s, m = step(s, batch)
    results[chunks] = (s.params, m)
  for chunks in (2, 4):
    for a, b in zip(jax.tree.leaves(results[chunks][0]), jax.tree.leaves(results[1][0])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(results[chunks][1]['loss']) == pytest.approx(float(results[1][1]['loss']), rel=1e-5)
    assert float(results[chunks][1]['accuracy']) == float(results[1][1]['accuracy'])
  moved = max(float(jnp.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(state.params)))
  assert moved > 1e-3  # the steps did change the parameters


# ---------------------------------------------------------------------------------------------
# bfloat16 (config.model.dtype)


@pytest.mark.parametrize('x_shape, k_shape', [((4, 12, 12, 32), (3, 3, 32, 16)),
                                              pytest.param((4, 28, 28, 1), (5, 5, 1, 8),
                                                           marks=pytest.mark.slow)])
def test_bfloat16_convolution_is_xlas_up_to_bfloat16_rounding(x_shape, k_shape):
  # bf16_conv rounds its input, kernel and output to bfloat16 (float32 sums in between), and its
  # gradients round dy: a few roundings of relative error <= 2^-9 each (bfloat16 keeps 8
  # significant bits), so errors (in norm) ~0.003 here; 2^-7 bounds them, while a wrong
  # gradient (a term missing, a kernel transposed) is off by order 1.
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], x_shape)
  kernel = 0.3 * jax.random.normal(keys[1], k_shape)
  bias = jax.random.normal(keys[2], k_shape[-1:])

  def reference(x, kernel, bias):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias

  def bf16(x, kernel, bias):
    return model_lib.bf16_conv(x.astype(jnp.bfloat16), kernel, bias)

  want, want_vjp = jax.vjp(reference, x, kernel, bias)
  dy = jax.random.normal(keys[3], want.shape)
  rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
  for fn in (bf16, jax.jit(bf16)):
    got, got_vjp = jax.vjp(fn, x, kernel, bias)
    assert got.dtype == jnp.bfloat16 and rel(got, want) < 2 ** -7
    for g, w, primal in zip(got_vjp(dy.astype(jnp.bfloat16)), want_vjp(dy), (x, kernel, bias)):
      assert g.dtype == primal.dtype == jnp.float32  # float32 parameters get float32 gradients
      assert rel(g, w) < 2 ** -7


@pytest.mark.parametrize('conv_impl', ['im2col', 'lax', *[pytest.param(c, marks=pytest.mark.slow)
                                                     for c in ('mixed', 'winograd')]])
def test_bfloat16_model_has_the_float32_models_parameters_and_float32_logits(conv_impl):
  f32 = model_lib.CNN(conv_impl=conv_impl, pool_impl='reshape')
  bf16 = f32.clone(dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(2), (8, 28, 28, 1))
  params = f32.init(jax.random.key(1), x)['params']
  # The same parameters, initialized alike, stored as float32: checkpoints fit either dtype.
  bf16_params = bf16.init(jax.random.key(1), x)['params']
  assert jax.tree.structure(bf16_params) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(bf16_params), jax.tree.leaves(params)):
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  logits = jax.jit(bf16.apply)({'params': params}, x)
  assert logits.dtype == jnp.float32  # the softmax and the loss are float32's
  want = f32.apply({'params': params}, x)
  # bfloat16 activations through 5 layers: a few percent of the logits' scale.
  assert float(jnp.linalg.norm(logits - want) / jnp.linalg.norm(want)) < 0.05


def test_kernel_sizes_and_torchs_conv_init_shape_the_layers():
  # the speedrun-like model: 5x5 then 3x3 kernels, PyTorch's Conv2d initialization
  # (uniform in +-1/sqrt(fan_in)) for the kernels.
  model = model_lib.CNN(conv_features=(24, 32), kernel_sizes=(5, 3), pool_after=(0, 1),
                        dense_features=256, conv_init='torch', conv_impl='im2col',
                        pool_impl='reshape')
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  assert params['conv1']['kernel'].shape == (5, 5, 1, 24)
  assert params['dense1']['kernel'].shape == (800, 256)  # 28 -> 24 -> 12 -> 10 -> 5
  assert model_lib.count_params(params) == 215_194
  for name, fan_in in (('conv1', 25), ('conv2', 9 * 24)):
    kernel = np.asarray(params[name]['kernel'])
    assert np.abs(kernel).max() <= fan_in ** -0.5
    assert kernel.std() == pytest.approx((3 * fan_in) ** -0.5, rel=0.1)
  assert model_lib.used_input_size(28, 2, (0, 1), (5, 3)) == 28
  reference = model.clone(conv_impl='lax', pool_impl='lax', skip_dead_rows=False)
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  np.testing.assert_allclose(model.apply({'params': params}, x),
                             reference.apply({'params': params}, x), rtol=1e-5, atol=1e-5)


def test_input_norm_standardizes_the_pixels_and_dense_init_torch_is_pytorchs_linear():
  # model.input_norm=(mean, std): the model sees (x - mean) / std; the default (0, 1) leaves the
  # pixels as they are. model.dense_init='torch': PyTorch's Linear, uniform in +-1/sqrt(fan_in).
  plain = model_lib.CNN(conv_features=(8, 8), kernel_sizes=(5, 3), pool_after=(0, 1),
                        dense_features=64, conv_init='torch', dense_init='torch')
  standardized = plain.clone(input_norm=(0.1307, 0.3081))
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  params = plain.init(jax.random.key(0), x)['params']
  np.testing.assert_allclose(standardized.apply({'params': params}, x),
                             plain.apply({'params': params}, (x - 0.1307) / 0.3081),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(standardized.apply({'params': params}, x),
                         plain.apply({'params': params}, x), atol=1e-3)
  for name, fan_in in (('dense1', 8 * 5 * 5), ('dense2', 64)):
    kernel = np.asarray(params[name]['kernel'])
    assert np.abs(kernel).max() <= fan_in ** -0.5
    assert kernel.std() == pytest.approx((3 * fan_in) ** -0.5, rel=0.1)
  keras = plain.clone(dense_init='keras').init(jax.random.key(0), x)['params']
  assert np.asarray(keras['dense1']['kernel']).std() == pytest.approx(
      (2 / 200) ** 0.5, rel=0.1)  # he_uniform, the tutorial's
