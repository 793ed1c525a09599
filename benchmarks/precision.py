"""Whole training steps and evaluation in float32 against bfloat16 (config.model.dtype), as a run
makes them: the config's 'auto' choices, the device input (lax.scan over `chunk_steps` steps per
call, batches gathered on device), trials interleaved, medians.

  python benchmarks/precision.py                         # the tutorial's step (configs/default.py)
  python benchmarks/precision.py --config configs/speedrun.py --trials 9
  python benchmarks/precision.py --override model.conv_impl=winograd

The images are random uint8 (the arithmetic does not depend on their values); the split has
the tutorial's 54,000 training images. Prints ms per step and images/s per dtype, their ratio,
and the evaluator's forward pass over 10,000 images.
"""
import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from digitjax import configlib, data, inference, loop, members, parallel, pipeline, steps  # noqa: E402
from digitjax import model as model_lib  # noqa: E402

TRAIN_IMAGES = 54000


def load_config(path, overrides):
  spec = importlib.util.spec_from_file_location('config_module', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    for key, value in members.parse_overrides(item, '--override').items():
      configlib.set_field(config, key, value)
  configlib.validate(config)
  return config


def make_runner(config, arrays, mesh):
  """A compiled chunk of steps for `config`, and its state: (run(state, sums) -> ..., state,
  sums, steps per call)."""
  choices = configlib.resolve(config)
  spe = TRAIN_IMAGES // config.batch_size
  model = model_lib.build_model(config.model, choices.conv_impl, choices.pool_impl)
  spec = steps.spec(config, model, spe, choices.grad_chunks)
  hp = steps.hyper(config, spe)
  state = jax.jit(functools.partial(steps.init_state, spec, hp))(jax.random.key(0))
  sums = steps.empty_sums()
  step_fn = functools.partial(loop._step_with_numbers, hp=hp, spec=spec)
  feed = pipeline.DeviceInput(arrays, config.batch_size, mesh, step_fn, config.chunk_steps)
  feed.compile(state, sums, {})
  perm = jax.device_put(jnp.asarray(data.epoch_permutation(0, 0, TRAIN_IMAGES), jnp.int32))
  chunk = feed.chunk

  def run(state, sums, first=[0]):
    # Consecutive chunks of the epoch, from its start again when it ends.
    if (first[0] + chunk) * config.batch_size > TRAIN_IMAGES:
      first[0] = 0
    out = feed._run(state, sums, feed.arrays, perm, (np.int32(first[0]), np.int32(chunk)), {})
    first[0] += chunk
    return jax.block_until_ready(out)

  return run, state, sums, chunk, choices


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--override', action='append', default=[],
                      help="config overrides, 'field=value; field=value' (repeatable)")
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--trials', type=int, default=7, help='interleaved trials per dtype')
  parser.add_argument('--calls', type=int, default=2, help='scan calls (chunks) per trial')
  parser.add_argument('--no-eval', action='store_true', help='skip the evaluation timing')
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  split = {'image': rng.integers(0, 256, (TRAIN_IMAGES, 28, 28, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, TRAIN_IMAGES).astype(np.int32)}
  mesh = parallel.make_mesh()
  arrays = pipeline.place(split, mesh)
  dtypes = args.dtypes.split(',')
  runners, states, evaluators = {}, {}, {}
  for dtype in dtypes:
    config = load_config(args.config, args.override + [f'model.dtype={dtype}'])
    run, state, sums, chunk, choices = make_runner(config, arrays, mesh)
    runners[dtype] = (run, chunk, config.batch_size)
    states[dtype] = run(state, sums)  # warm-up
    evaluators[dtype] = inference.Evaluator.for_config(config, mesh, choices)
  print(f'{args.config} {" ".join(args.override)}: {choices.line()}, batch '
        f'{config.batch_size}, {chunk} steps per call, {args.calls} calls per trial, '
        f'{args.trials} trials; load average {os.getloadavg()[0]:.2f}', flush=True)

  times = {d: [] for d in dtypes}
  for _ in range(args.trials):
    for dtype in dtypes:
      run, chunk, _ = runners[dtype]
      start = time.perf_counter()
      for _ in range(args.calls):
        states[dtype] = run(*states[dtype])
      times[dtype].append((time.perf_counter() - start) / (args.calls * chunk) * 1e3)
  print(f'load average after the steps {os.getloadavg()[0]:.2f}')
  for dtype in dtypes:
    t, batch = times[dtype], runners[dtype][2]
    print(f'train step {dtype:<9} {statistics.median(t):7.3f} ms median ({min(t):.3f}-'
          f'{max(t):.3f}), {batch * 1e3 / statistics.median(t):7.0f} images/s')
  if len(dtypes) == 2:
    a, b = (statistics.median(times[d]) for d in dtypes)
    print(f'{dtypes[1]} / {dtypes[0]}: x{a / b:.2f} images/s')

  if not args.no_eval:
    images = split['image'][:10000]
    eval_times = {d: [] for d in dtypes}
    for dtype in dtypes:
      evaluators[dtype].logits(states[dtype][0], images)
    for _ in range(max(3, args.trials // 2)):
      for dtype in dtypes:
        start = time.perf_counter()
        evaluators[dtype].logits(states[dtype][0], images)
        eval_times[dtype].append(time.perf_counter() - start)
    for dtype in dtypes:
      print(f'evaluation {dtype:<9} {statistics.median(eval_times[dtype]):7.3f} s median '
            f'for 10,000 images')


if __name__ == '__main__':
  main()
