"""The config file launch.py uses when --config is not given: the one the workdir was trained
with (inference.stored_config), so eval, predict, report and export need only --workdir, and a
run resumes from it too; `--config.field=value` overrides still apply on top. Fields added since
the workdir was trained take the values that do what was done then (configlib.ADDED_FIELDS)."""
import ml_collections

from digitjax.errors import UserError


def _tuples(value):
  """JSON keeps sequences as lists; the configs hold tuples (overrides parse to tuples)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _workdir_argument() -> str | None:
  """--workdir from the command line (this file loads while absl still parses the flags)."""
  import sys
  args = sys.argv[1:]
  for i, arg in enumerate(args):
    if arg.startswith('--workdir='):
      return arg.split('=', 1)[1]
    if arg == '--workdir' and i + 1 < len(args):
      return args[i + 1]
  return None


def get_config():
  from digitjax import inference
  workdir = _workdir_argument()
  if not (workdir or '').strip():
    raise UserError('--workdir is required (e.g. python launch.py --workdir=runs/default '
                    '--mode=eval)')
  record = inference.stored_config(workdir)
  if record is None:
    raise UserError(f'--workdir={workdir} holds no trained run to take the config from; give '
                    f'--config=configs/<name>.py')
  from digitjax import configlib
  return ml_collections.ConfigDict(configlib.with_added_fields(_tuples(record)))
