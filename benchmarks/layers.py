"""Where a training step's time goes: each layer's forward + backward at batch 32, jitted alone,
for XLA's layers and for the CPU formulations digitjax uses; then whole training steps, called
one by one and inside lax.scan, with the gradient in 1 or 2 chunks; then inference (the
evaluator's forward pass over 10,000 images) per formulation, and for a 3-member ensemble
vmapped or member by member.

  python benchmarks/layers.py                # everything (~3 min)
  python benchmarks/layers.py --inference    # only the inference rows
"""
import contextlib
import os
import statistics
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
  if impl in ('im2col', 'winograd'):
    fn = model_lib.im2col_conv if impl == 'im2col' else model_lib.winograd_conv
    return lambda x, k: fn(x, k, (1, 1), 'VALID')
  return lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def main():
  key = jax.random.key(0)
  # Shapes after digitjax's crop of dead rows: 26x26 -> 24 -> 12 -> 10 -> 8 -> 4.
  for size, cin, cout in ((26, 1, 32), (12, 32, 64), (10, 64, 64)):
    x = jax.random.normal(key, (BATCH, size, size, cin))
    k = jax.random.normal(key, (3, 3, cin, cout))
    for impl in ('lax', 'im2col', 'winograd'):
      f = conv(impl)
      timed(f'conv {size}x{size}x{cin}->{cout} {impl} fwd+bwd',
            lambda x, k: jax.grad(lambda x, k: jax.nn.relu(f(x, k)).sum(), (0, 1))(x, k), x, k)
  # im2col's kernel gradient for one gradient chunk (16 images) of conv2 and conv3: JAX's rule,
  # patches^T . dy (a transposed left operand: Eigen on XLA:CPU), and digitjax's
  # (dy^T . patches)^T (model._patch_matmul; a plain product: YNNPACK).
  for rows, depth in ((BATCH // 2 * 10 * 10, 288), (BATCH // 2 * 8 * 8, 576)):
    patches = jax.random.normal(key, (rows, depth))
    dy = jax.random.normal(key, (rows, 64))
    kernel = jax.random.normal(key, (depth, 64))
    timed(f'kernel grad {rows}x{depth} patches^T.dy',
          lambda p, dy: jax.vjp(lambda k: p @ k, kernel)[1](dy)[0], patches, dy)
    timed(f'kernel grad {rows}x{depth} (dy^T.patches)^T',
          lambda p, dy: jax.vjp(lambda k: model_lib._patch_matmul(p, k), kernel)[1](dy)[0],
          patches, dy)
  x = jax.random.normal(key, (BATCH, 24, 24, 32))
  for impl in ('lax', 'reshape'):
    timed(f'pool 24x24x32 {impl} fwd+bwd',
          lambda x: jax.grad(lambda x: model_lib.max_pool_2x2(x, impl).sum())(x), x)
  whole_steps(key)
  inference(key)


def inference(key, n=10000, batch=1000, members=3, trials=5):
  """train.Evaluator over n images per formulation (forward only), and a stacked ensemble: one
  vmapped program vs the members one by one (what Evaluator does). Medians over trials."""
  from digitjax import ensemble, parallel, train
  images = jax.random.randint(key, (n, 28, 28, 1), 0, 256).astype(jnp.uint8)
  images = jax.device_get(images)
  mesh = parallel.make_mesh()

  def model_state(model, seed):
    params = model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))['params']
    return train.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.01),
                                   rng=jax.random.key_data(key))

  def vmapped(state, images, step=jax.jit(jax.vmap(train.eval_step, in_axes=(0, None)))):
    return [step(state, {'image': images[i:i + batch]}) for i in range(0, n, batch)]

  runs = {}
  for conv_impl, pool_impl in (('lax', 'lax'), ('mixed', 'reshape'), ('im2col', 'reshape')):
    model = model_lib.CNN(conv_impl=conv_impl, pool_impl=pool_impl)
    evaluator = train.Evaluator(mesh, batch)
    runs[f'inference {conv_impl}/{pool_impl}, {n} images'] = (
        evaluator.logits, model_state(model, 0))
    stacked = ensemble.stack([model_state(model, i) for i in range(members)])
    runs[f'inference {conv_impl}/{pool_impl}, {members} members one by one'] = (
        train.Evaluator(mesh, batch, members).logits, stacked)
    runs[f'inference {conv_impl}/{pool_impl}, {members} members vmapped'] = (vmapped, stacked)
  times = {k: [] for k in runs}
  for k, (f, s) in runs.items():
    jax.block_until_ready(f(s, images))  # compile
  for _ in range(trials):
    for k, (f, s) in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(f(s, images))
      times[k].append(time.perf_counter() - start)
  for k, t in times.items():
    print(f'{k:<52} {statistics.median(t):7.3f} s median {min(t):7.3f} s min', flush=True)


@contextlib.contextmanager
def _jax_kernel_gradient(on: bool):
  """While tracing: im2col's matmul as a plain jnp.dot, whose kernel gradient is JAX's rule."""
  saved = model_lib._patch_matmul
  if on:
    model_lib._patch_matmul = lambda p, k, precision=None: jnp.dot(p, k, precision=precision)
  try:
    yield
  finally:
    model_lib._patch_matmul = saved


def whole_steps(key, trials=9, steps=60):
  """digitjax's own train_step (SGD 0.01/0.9, batch 32) per formulation: per-step jit calls, and
  the same step inside lax.scan (the device input's loop). Trials are interleaved, so a noisy
  machine affects every variant alike; medians and minimums over trials."""
  from digitjax import train
  images = jax.random.randint(key, (steps * BATCH, 28, 28, 1), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(steps * BATCH, dtype=jnp.int32) % 10
  batches = [{'image': images[i * BATCH:(i + 1) * BATCH], 'label': labels[i * BATCH:(i + 1) * BATCH]}
             for i in range(steps)]
  variants = {}
  # The last field: im2col's kernel gradient by JAX's own rule (patches^T . dy), as before
  # model._patch_matmul, to show what that formulation gains in a whole step.
  for conv_impl, pool_impl, skip, chunks, jax_rule in (
      ('lax', 'lax', False, 1, False), ('im2col', 'reshape', False, 1, False),
      ('im2col', 'reshape', True, 1, False), ('im2col', 'reshape', True, 2, False),
      ('mixed', 'reshape', True, 1, False), ('mixed', 'reshape', True, 2, False),
      ('mixed', 'reshape', True, 2, True), ('im2col', 'reshape', True, 2, True),
      ('im2col,winograd,winograd', 'reshape', True, 1, False),
      ('lax,winograd,winograd', 'reshape', True, 2, False)):
    model = model_lib.CNN(conv_impl=conv_impl, pool_impl=pool_impl, skip_dead_rows=skip)
    params = model.init(key, images[:1].astype(jnp.float32))['params']
    state = train.TrainState.create(apply_fn=model.apply, params=params,
                                    tx=optax.sgd(0.01, momentum=0.9),
                                    rng=jax.random.key_data(key))
    step = jax.jit(lambda s, b, chunks=chunks: train.train_step(s, b, grad_chunks=chunks)[0],
                   donate_argnums=0)

    def per_step(s, step=step):
      for b in batches:
        s = step(s, b)
      return s

    def body(s, i, chunks=chunks):
      b = {k: jax.lax.dynamic_slice_in_dim(v, i * BATCH, BATCH) for k, v in
           (('image', images), ('label', labels))}
      return train.train_step(s, b, grad_chunks=chunks)[0], None

    scanned = jax.jit(lambda s, body=body: jax.lax.scan(body, s, jnp.arange(steps))[0],
                      donate_argnums=0)
    name = f'{conv_impl}/{pool_impl} skip_dead_rows={skip} chunks={chunks}'
    if jax_rule:
      name += ' kernel grad patches^T.dy'
    variants[f'step {name}'] = (per_step, jax.tree.map(jnp.copy, state), jax_rule)
    variants[f'scan {name}'] = (scanned, jax.tree.map(jnp.copy, state), jax_rule)
  states = {}
  for k, (f, s, jax_rule) in variants.items():  # compile (the jit caches keep these traces), warm up
    with _jax_kernel_gradient(jax_rule):
      states[k] = jax.block_until_ready(f(s))
  times = {k: [] for k in variants}
  for _ in range(trials):
    for k, (f, _, _) in variants.items():
      start = time.perf_counter()
      states[k] = jax.block_until_ready(f(states[k]))
      times[k].append((time.perf_counter() - start) / steps * 1e3)
  for k, t in times.items():
    print(f'{k:<52} {statistics.median(t):7.3f} ms median {min(t):7.3f} ms min', flush=True)


if __name__ == '__main__':
  if sys.argv[1:] == ['--inference']:
    inference(jax.random.key(0))
  else:
    main()
