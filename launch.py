"""Runs digitjax: python launch.py --config=configs/default.py --workdir=DIR [--config.x=y].

--mode=train (default) trains; eval, predict and report use a trained workdir (README.md).
"""
import os
import signal
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'report'],
                  'train; eval a checkpoint; predict digits in images; report: redraw the plots.')
flags.DEFINE_string('checkpoint', None, "eval/predict/report: 'best', 'latest' or a step "
                    "(default: best; report: latest, the state results.json describes).")
flags.DEFINE_enum('split', 'test', ['train', 'validation', 'test'], 'eval: the split to evaluate.')
flags.DEFINE_list('inputs', None, 'predict: image files, folders of them, .npy/.npz arrays.')
flags.DEFINE_string('output', None, 'predict: the CSV file to write (default: stdout).')
flags.DEFINE_string('member', None, 'eval/predict/report on a population: one member (its index '
                    'or name) instead of what the population delivers.')
flags.mark_flags_as_required(['config', 'workdir'])
# The modes each optional flag means something to: anywhere else it is a mistake, not a no-op.
MODE_FLAGS = {'checkpoint': ('eval', 'predict', 'report'), 'split': ('eval',),
              'inputs': ('predict',), 'output': ('predict',),
              'member': ('eval', 'predict', 'report')}


def check_mode_flags():
  for name, modes in MODE_FLAGS.items():
    if FLAGS[name].present and FLAGS.mode not in modes:
      raise app.UsageError(f'--{name} applies to --mode={"|".join(modes)} only')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  check_mode_flags()
  if not FLAGS['verbosity'].present:  # orbax and tfds are chatty at INFO; -v 0 brings it back
    absl_logging.set_verbosity(absl_logging.WARNING)
  import jax
  from digitjax import configlib
  cache = configlib.compilation_cache_dir(FLAGS.config)
  if cache:  # later runs load compiled steps instead of compiling
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  from digitjax import parallel
  parallel.initialize_distributed(FLAGS.config.distributed)  # before anything touches devices
  from digitjax import loop, population
  from digitjax.errors import UserError
  absl_logging.info('JAX devices: %s (process %d of %d)', jax.devices(), jax.process_index(),
               jax.process_count())
  try:
    if FLAGS.mode == 'train':
      population.train(FLAGS.config, FLAGS.workdir)
    else:
      from digitjax import modes
      sys.exit(modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir, FLAGS.checkpoint,
                         FLAGS.split, FLAGS.inputs, FLAGS.output, FLAGS.member))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except loop.Preempted:
    for sig in (signal.SIGTERM, signal.SIGINT):  # the checkpoint is saved: ignore more signals
      signal.signal(sig, signal.SIG_IGN)
    sys.exit(143)


if __name__ == '__main__':
  app.run(main)
