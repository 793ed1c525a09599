"""Population-based training of the tutorial's recipe: 4 slots, 2 epochs, their learning rate
and momentum searched as they train.

The tutorial's model, batch 32, SGD with momentum and a constant learning rate, as
configs/sweep.py's members, at the same cost as one seed of its grid (4 members x 2 epochs).
Every 421 steps (a quarter of an epoch) the slots are scored on validation loss; the worst
quarter copies the weights, optimizer state and numbers of one of the best quarter, then
multiplies each number by 0.8 or 1.2 (or, 1 time in 4, draws it anew from the space). The
population delivers its best slot by validation loss; found_config.py in the workdir replays
that slot's numbers from scratch as a single run.

  python launch.py --config=configs/search.py --workdir=runs/search \
      --config.data.manual_dir=../shared/data/mnist
  optuna-dashboard sqlite:///runs/search/study.db      # the search, trial by trial

Measured: README.md "Search" (benchmarks/search.py).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.num_epochs = 2.0
  config.search.kind = 'pbt'
  config.search.space = 'learning_rate=loguniform(0.002,0.2); momentum=uniform(0.8,0.97)'
  config.search.size = 4
  config.search.ready_steps = 421                            # a quarter of an epoch of batch 32
  config.search.metric = 'val_loss'
  config.sweep.select = 'best'                               # by validation loss (the metric)
  return config
