"""digitjax: functional-style training of digit recognizers with JAX and Flax.

  results = digitjax.train(config, workdir)   # a run, or a population of members
  pandas.DataFrame(results['members'])        # a population's members, one row each
"""
__version__ = '0.2.0'


def train(config, workdir: str) -> dict:
  """Trains `config` (configs/*.py's get_config(), with any sweep) in `workdir`, resuming what
  was started there; returns what workdir/results.json holds (population.train)."""
  from digitjax import population
  return population.train(config, workdir)
