"""A learning-rate sweep of the tutorial's recipe: 4 learning rates x 3 seeds, 2 epochs each.

The tutorial's model, batch 32, SGD with momentum 0.9 and a constant learning rate, at 0.003,
0.01 (the tutorial's), 0.03 and 0.1, each with seeds 0, 1 and 2: twelve members that differ only
in numbers, so they train as one group. The population delivers its best member by validation
accuracy; the table, population.csv and plots/population_*.png compare them all.

  python launch.py --config=configs/sweep.py --workdir=runs/sweep \
      --config.data.manual_dir=../shared/data/mnist

Measured on a 2-core x86 CPU: README.md "Experiments".
"""
from configs import default


def get_config():
  config = default.get_config()
  config.num_epochs = 2.0                                   # a short schedule per member
  config.sweep.grid = 'learning_rate=0.003,0.01,0.03,0.1; seed=0,1,2'
  config.sweep.select = 'best'                              # by validation accuracy
  return config
