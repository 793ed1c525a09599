"""Successive halving of the tutorial's recipe: 4 slots, 2 epochs, ASHA's rule with eta 2.

The space and the cost of configs/search.py (4 slots x 2 epochs). A slot is judged when its
age reaches a rung (421, 842, 1684 and 3368 steps): it goes on if it is in the best half of
all that reached that rung, else it is culled and its slot refilled with a new proposal of
optuna's TPE sampler (fresh parameters, its own age from 0). The population delivers its best
slot by validation loss.

  python launch.py --config=configs/halving.py --workdir=runs/halving \
      --config.data.manual_dir=../shared/data/mnist

Measured: README.md "Search" (benchmarks/search.py).
"""
from configs import search


def get_config():
  config = search.get_config()
  config.search.kind = 'halving'
  config.search.eta = 2
  return config
