"""Runs digitjax: python launch.py --config=configs/default.py --workdir=DIR [--config.x=y]."""
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # orbax and tfds are chatty at INFO; -v 0 brings it back
    absl_logging.set_verbosity(absl_logging.WARNING)
  import jax
  from digitjax import train
  from digitjax.errors import UserError
  absl_logging.info('JAX devices: %s (process %d of %d)', jax.devices(), jax.process_index(),
               jax.process_count())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except train.Preempted:
    sys.exit(143)


if __name__ == '__main__':
  app.run(main)
