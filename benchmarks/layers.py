"""Where a training step's time goes: each layer's forward + backward at batch 32, jitted alone,
for XLA's layers and for the CPU formulations digitjax uses; then whole steps.

  python benchmarks/layers.py
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from digitjax import model as model_lib  # noqa: E402

BATCH = 32


def timed(name, fn, *args, repeats=300):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  print(f'{name:<44} {(time.perf_counter() - wall) / repeats * 1e3:7.3f} ms wall '
        f'{(time.process_time() - cpu) / repeats * 1e3:7.3f} ms cpu', flush=True)


def conv(impl):
  if impl == 'im2col':
    return lambda x, k: model_lib.im2col_conv(x, k, (1, 1), 'VALID')
  return lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def main():
  key = jax.random.key(0)
  # Shapes after digitjax's crop of dead rows: 26x26 -> 24 -> 12 -> 10 -> 8 -> 4.
  for size, cin, cout in ((26, 1, 32), (12, 32, 64), (10, 64, 64)):
    x = jax.random.normal(key, (BATCH, size, size, cin))
    k = jax.random.normal(key, (3, 3, cin, cout))
    for impl in ('lax', 'im2col'):
      f = conv(impl)
      timed(f'conv {size}x{size}x{cin}->{cout} {impl} fwd+bwd',
            lambda x, k: jax.grad(lambda x, k: jax.nn.relu(f(x, k)).sum(), (0, 1))(x, k), x, k)
  x = jax.random.normal(key, (BATCH, 24, 24, 32))
  for impl in ('lax', 'reshape'):
    timed(f'pool 24x24x32 {impl} fwd+bwd',
          lambda x: jax.grad(lambda x: model_lib.max_pool_2x2(x, impl).sum())(x), x)
  images = jax.random.uniform(key, (BATCH, 28, 28, 1))
  labels = jnp.arange(BATCH) % 10
  for conv_impl, pool_impl, skip in (('lax', 'lax', False), ('im2col', 'reshape', False),
                                     ('im2col', 'reshape', True)):
    model = model_lib.CNN(conv_impl=conv_impl, pool_impl=pool_impl, skip_dead_rows=skip)
    params = model.init(key, images[:1])['params']
    tx = optax.sgd(0.01, momentum=0.9)

    def step(params, opt_state, model=model, tx=tx):
      loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
          model.apply({'params': p}, images), labels).mean()
      grads = jax.grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    timed(f'step {conv_impl}/{pool_impl} skip_dead_rows={skip}', step, params, tx.init(params),
          repeats=150)


if __name__ == '__main__':
  main()
