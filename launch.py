"""Runs digitjax: python launch.py --config=configs/default.py --workdir=DIR [--config.x=y].

--mode=train (default) trains; eval, predict, report and export use a trained workdir
(README.md).

Every failure a user can cause ends in one line on stderr and a documented exit status:
  0  done;  1  predict: some inputs could not be read (one line each, the others predicted);
  2  an error the user can fix (`error: <problem>; <fix>`), nothing lost;
  130 / 143  stopped by SIGINT / SIGTERM (a checkpoint saved when training had started).
"""
from digitjax import signals

signals.install()  # from the first moment: a Ctrl-C during the imports is seen, not swallowed

import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from digitjax.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
STORED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'digitjax',
                             'stored_config.py')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py); default: the config '
                                'the --workdir was trained with.', lock_config=True)
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'report', 'export'],
                  'train; eval a checkpoint; predict digits in images; report: redraw the plots; '
                  'export: write a TensorFlow SavedModel and an ONNX model.')
flags.DEFINE_string('checkpoint', None, "eval/predict/report/export: 'best', 'latest' or a step "
                    "(default: best; report: latest, the state results.json describes).")
flags.DEFINE_enum('split', 'test', ['train', 'validation', 'test', 'uci_digits'],
                  'eval: the split to evaluate (uci_digits: 1,797 digits of other writers).')
flags.DEFINE_string('inputs', None, 'predict: image files, folders of them, .npy/.npz arrays, '
                    'separated by commas (a path that exists as given is taken whole, commas '
                    'and all).')
flags.DEFINE_string('output', None, 'predict: the CSV file to write (default: stdout); export: '
                    'the folder to write savedmodel/ and model.onnx into (default: '
                    'WORKDIR/export).')
flags.DEFINE_string('debug_pause_at', '', 'Debugging and tests: hold the run once at each named '
                    'phase (e.g. step:300,saving,exiting; digitjax/signals.py PHASES lists them) '
                    'until SIGINT or SIGTERM comes, saying so on stderr.')
flags.DEFINE_string('member', None, 'eval/predict/report/export on a population: one member (its '
                    'index or name) instead of what the population delivers.')
flags.DEFINE_integer('tta', 1, 'eval/predict: test-time augmentation, the mean probabilities of '
                     'this many views: the image, shifted 1 px right, left, down, up, rotated '
                     '+10 and -10 degrees, the first N in this order (1 = none).')
# The modes each optional flag means something to: anywhere else it is a mistake, not a no-op.
MODE_FLAGS = {'checkpoint': ('eval', 'predict', 'report', 'export'), 'split': ('eval',),
              'inputs': ('predict',), 'output': ('predict', 'export'),
              'member': ('eval', 'predict', 'report', 'export'), 'tta': ('eval', 'predict')}


def fail(message: str, status: int = 2):
  last_line(f'error: {message}')
  sys.exit(status)


def last_line(text: str) -> None:
  """Writes `text` as the last line on stderr, for good: signals are ignored from here on (what
  is left is the exit; a signal in the interpreter's shutdown killed the process, status -15),
  and what libraries' threads log after it (orbax's, at ERROR level, after a failed save) goes
  to /dev/null instead of burying it."""
  signals.ignore()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  console = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  os.close(null)
  os.write(console, (text + '\n').encode(errors='replace'))
  os.close(console)


HELP_FLAGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull')


def parse_flags(argv):
  """absl's parsing, with each mistake (an unknown flag or config field, a config file that is
  missing or does not load) as one line instead of a traceback or the usage text."""
  if any(a in HELP_FLAGS for a in argv[1:]):  # before a config loads: it may need --workdir
    app.usage(shorthelp=True, writeto_stdout=True)
    sys.exit(0)
  if not any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    # The workdir's own config: ml_collections passes what follows the first ':' to get_config.
    argv = [argv[0], f'--config={STORED_CONFIG}:{_workdir_argument(argv) or ""}', *argv[1:]]
  try:
    rest = FLAGS(argv)
    config = FLAGS['config'].value  # the file is loaded, and the overrides applied, here
    error = getattr(config, '_error', None)  # ml_collections defers a file's load error
    if error is not None:
      raise error
  except flags.Error as e:
    fail(f'{" ".join(str(e).split())[:300]}; see python launch.py --help')
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    fail(_unknown_field_message(e))
  except UserError as e:  # no --config, and a workdir without a trained run's config
    fail(str(e))
  except Exception as e:  # a config file that is missing, or raises while loading
    if isinstance(e, OSError) or 'No such file' in str(e):
      fail(f'--config: {_config_path(argv)}: no such file; pick one of configs/*.py')
    fail(f'--config: the config file does not load ({type(e).__name__}: '
         f'{(str(e).splitlines() or [""])[0][:200]}); fix it or pick a file in configs/')
  if not (FLAGS['workdir'].value or '').strip():
    fail(f'--workdir is {"empty" if FLAGS["workdir"].present else "required"} (e.g. python '
         f'launch.py --config=configs/default.py --workdir=runs/default)')
  return rest


def _workdir_argument(argv) -> str | None:
  """--workdir from the command line, before absl parses it (the stored config needs it)."""
  args = argv[1:]
  for i, arg in enumerate(args):
    if arg.startswith('--workdir='):
      return arg.split('=', 1)[1]
    if arg == '--workdir' and i + 1 < len(args):
      return args[i + 1]
  return None


def _config_path(argv) -> str:
  given = [a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')]
  return given[-1] if given else '(none given)'


def _unknown_field_message(e: Exception) -> str:
  """configlib's one line for an override of an unknown or removed field."""
  import re
  from digitjax import configlib
  text = str(e.args[0] if e.args else e)
  name = re.search(r'([A-Za-z_][A-Za-z0-9_]*)', text)
  given = [a.split('=', 1)[0][len('--config.'):] for a in sys.argv[1:]
           if a.startswith('--config.')]
  field = next((g for g in given if name and g.split('.')[-1] == name.group(1)), None)
  if field is None:
    return f'--config: {" ".join(text.split())[:200]}'
  return str(configlib.unknown_field(_default_config(), field))


def _default_config():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs'))
  import default
  return default.get_config()


def check_mode_flags():
  for name, modes in MODE_FLAGS.items():
    if FLAGS[name].present and FLAGS.mode not in modes:
      fail(f'--{name} applies to --mode={"|".join(modes)} only; leave it out of --mode='
           f'{FLAGS.mode}')
  if FLAGS.checkpoint is not None and not FLAGS.checkpoint.strip():
    fail("--checkpoint is empty: give 'best', 'latest' or a step number")


def input_paths(value: str | None) -> list[str]:
  if not value:
    return []
  return [value] if os.path.exists(value) else [p for p in value.split(',') if p]


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  check_mode_flags()
  try:
    signals.pause_at(FLAGS.debug_pause_at)
  except ValueError as e:
    fail(str(e))
  if not FLAGS['verbosity'].present:  # orbax and tfds are chatty at INFO; -v 0 brings it back
    absl_logging.set_verbosity(absl_logging.WARNING)
  from digitjax import metrics
  metrics.quiet_notices()
  import jax
  from digitjax import configlib
  cache = configlib.compilation_cache_dir(FLAGS.config)
  if cache:  # later runs load compiled steps instead of compiling
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  from digitjax import parallel, workdir as workdir_lib
  try:
    signals.reached('starting')
    signals.check('while starting; nothing was written')
    parallel.initialize_distributed(FLAGS.config.distributed)  # before anything uses devices
    from digitjax import population
    absl_logging.info('JAX devices: %s (process %d of %d)', jax.devices(), jax.process_index(),
                      jax.process_count())
    if FLAGS.mode == 'train':
      population.train(FLAGS.config, FLAGS.workdir)
      status = 0
    else:
      from digitjax import modes
      status = modes.run(FLAGS.config, FLAGS.workdir, modes.Request(
          FLAGS.mode, FLAGS.checkpoint, FLAGS.split, input_paths(FLAGS.inputs), FLAGS.output,
          FLAGS.member, FLAGS.tta))
  except UserError as e:
    fail(str(e))
  except signals.Interrupted as e:
    if e.saved:  # its 'Stopped by ... checkpoint saved' line is on stdout
      signals.ignore()  # nothing is left to do: further signals change nothing
    else:
      last_line(f'{e}; run the same command to start again')
    sys.exit(e.exit_status)
  except OSError as e:
    if e.errno in workdir_lib.DISK_ERRNOS and e.filename:
      fail(f'cannot write {e.filename}: {e.strerror}; nothing else was changed; make it '
           f'writable (or free space) and run the same command')
    raise
  signals.reached('exiting')
  received = signals.received()
  signals.ignore()  # the results are complete: a signal from here on changes nothing
  if received:
    print(f'{received} came while the run was finishing; its results are complete',
          file=sys.stderr, flush=True)
  sys.exit(status)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
