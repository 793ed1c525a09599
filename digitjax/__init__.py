"""digitjax: functional-style training of digit recognizers with JAX and Flax.

  results = digitjax.train(config, workdir)   # a run, or a population of members
  pandas.DataFrame(results['members'])        # a population's members, one row each
"""
__version__ = '0.2.0'  # pyproject.toml reads it from here: pip and the package say the same


def train(config, workdir) -> dict:
  """Trains `config` (configs/*.py's get_config(), with any sweep) in `workdir` (a str or a
  pathlib.Path), resuming what was started there; returns what workdir/results.json holds
  (population.train). Arguments of the wrong kind are a UserError before any work."""
  workdir = _checked_arguments(config, workdir)
  from digitjax import population
  return population.train(config, workdir)


def _checked_arguments(config, workdir) -> str:
  import os
  import ml_collections
  from digitjax.errors import UserError
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f'digitjax.train: config is {_shown(config)}; give an '
                    f'ml_collections.ConfigDict, e.g. configs/default.py\'s get_config() (a '
                    f'dict from config.to_dict() becomes one with ml_collections.ConfigDict(d))')
  if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir).strip():
    raise UserError(f'digitjax.train: workdir is {_shown(workdir)}; give a folder path (a str '
                    f'or a pathlib.Path), e.g. \'runs/notebook\'')
  workdir = os.fspath(workdir)
  if not isinstance(workdir, str):
    raise UserError(f'digitjax.train: workdir is {_shown(workdir)}; give it as a str')
  return workdir


def _shown(value) -> str:
  if value is None:
    return 'None'
  if isinstance(value, (dict, list, tuple)):
    return _a(type(value).__name__)
  text = repr(value)
  return f'{text if len(text) <= 60 else text[:57] + "..."} ({_a(type(value).__name__)})'


def _a(name: str) -> str:
  return f'{"an" if name[0] in "aeiou" else "a"} {name}'
