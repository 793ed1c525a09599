import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import synthetic_digits
from digitjax import model as model_lib, train


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


@pytest.mark.parametrize('conv_impl,pool_impl', [('lax', 'lax'), ('im2col', 'lax'),
                                                 ('lax', 'reshape'), ('im2col', 'reshape')])
def test_fast_layers_match_reference_outputs_and_gradients(conv_impl, pool_impl):
  # The reference is the plain Keras-shaped network: nn.Conv, nn.max_pool, every row computed.
  reference = model_lib.CNN(conv_impl='lax', pool_impl='lax', skip_dead_rows=False)
  fast = model_lib.CNN(conv_impl=conv_impl, pool_impl=pool_impl)
  params = reference.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))['params']
  x = jax.random.uniform(jax.random.key(2), (8, 28, 28, 1))
  y = jnp.arange(8) % 10

  def loss(m, p):
    return optax.softmax_cross_entropy_with_integer_labels(m.apply({'params': p}, x), y).mean()

  # Same parameter names and shapes: checkpoints are interchangeable.
  fast_params = fast.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))['params']
  assert jax.tree.structure(fast_params) == jax.tree.structure(params)
  np.testing.assert_allclose(fast.apply({'params': params}, x),
                             reference.apply({'params': params}, x), rtol=1e-5, atol=1e-5)
  g_ref = jax.grad(lambda p: loss(reference, p))(params)
  g_fast = jax.grad(lambda p: loss(fast, p))(params)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


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


def test_train_step_lowers_loss_on_a_fixed_batch(config):
  state = train.create_train_state(config, jax.random.key(0))
  images, labels = synthetic_digits(32, seed=0)
  batch = {'image': images[..., None], 'label': labels.astype(np.int32)}
  step = jax.jit(train.train_step, donate_argnums=0)
  state, first = step(state, batch)
  for _ in range(20):
    state, metrics = step(state, batch)
  assert int(state.step) == 21
  assert float(metrics['loss']) < 0.25 * float(first['loss'])
