"""The config file launch.py uses when --config is not given: the one the workdir was trained
with (inference.stored_config), so eval, predict, report and export need only --workdir, and a
run resumes from it too; `--config.field=value` overrides still apply on top. launch.py passes
the workdir as the file's argument (--config=stored_config.py:WORKDIR). Fields added since the
workdir was trained take the values that do what was done then (configlib.ADDED_FIELDS); fields
removed since are left out (configlib.REMOVED_FIELDS)."""
import ml_collections

from digitjax.errors import UserError


def _tuples(value):
  """JSON keeps sequences as lists; the configs hold tuples (overrides parse to tuples)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(workdir: str = ''):
  """The config `workdir` was trained with: launch.py passes the workdir through the config
  file's argument (--config=stored_config.py:WORKDIR)."""
  if not workdir.strip():
    raise UserError('--workdir is required (e.g. python launch.py --workdir=runs/default '
                    '--mode=eval)')
  return load(workdir)


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config `workdir` was trained with, checked: a damaged one (a field absent, of another
  type, or out of range) is a UserError naming the file and the field."""
  from digitjax import configlib, inference
  found = inference.stored_config_source(workdir)
  if found is None:
    raise UserError(f'--workdir={workdir} holds no trained run to take the config from; give '
                    f'--config=configs/<name>.py')
  record, path = found
  fix = ('the file is damaged: restore it, or give the config the run was trained with '
         '(--config=configs/<name>.py)')
  if not isinstance(record, dict):
    kind = type(record).__name__
    raise UserError(f"{path}: its 'config' is {record!r:.60} ({'an' if kind[0] in 'aeiou' else 'a'}"
                    f" {kind}), not an object; {fix}")
  record = configlib.with_added_fields(configlib.without_removed_fields(_tuples(record)))
  reference = _reference()
  problem = reference and configlib.stored_mismatch(record, reference)
  if problem:
    raise UserError(f'{path}: config field {problem}; {fix}')
  config = ml_collections.ConfigDict(record)
  try:
    configlib.validate(config)
  except UserError as e:
    raise UserError(f'{path}: {e}; {fix}') from None
  return config


def _reference() -> dict | None:
  """configs/default.py's config as a dict: every field and the kind of value it holds. None
  where the configs/ folder is not beside the package (an installed copy without it)."""
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'default.py')
  if not os.path.isfile(path):
    return None
  spec = importlib.util.spec_from_file_location('_digitjax_reference_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().to_dict()
