"""configs/best.py's recipe for seeds 0 to 5, trained as one population (one group: the members
differ only in their seed), delivering the mean probabilities of the six.

Each member computes, bit for bit, what its single run with --config.data.split_seed=0 would
(all six share the base seed's validation holdout); results.json has each member's figures
and the ensemble's. The test split is read once, at the end.

  python launch.py --config=configs/best_ensemble.py --workdir=runs/best_ensemble \
      --config.data.manual_dir=../shared/data/mnist
  python launch.py --workdir=runs/best_ensemble --mode=eval --checkpoint=latest --tta=5

Measured: docs/results.md "A record chosen on validation".
"""
from configs import best


def get_config():
  config = best.get_config()
  config.sweep.grid = 'seed=0,1,2,3,4,5'
  config.sweep.select = 'ensemble'     # the mean probabilities of the six
  return config
