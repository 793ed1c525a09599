"""Six models in two variants: three seeds of configs/augment.py's recipe as it is and three with
BatchNorm, a population whose mean probabilities are what it delivers.

Each member follows configs/augment.py (on-device rotation, zoom and shift; weight decay 5e-4;
one warmup epoch, then cosine decay from 0.05 to 0; Nesterov; batch 64; 15 epochs) with the
tutorial's layers, the second three with BatchNorm after each conv layer and the hidden dense
layer (model.batch_norm). The members differ in structure, so they form two groups trained one
after the other; every member uses its own seed for initialization, augmentation and example
order, and all share the validation holdout of the base seed.

  python launch.py --config=configs/ensemble.py --workdir=runs/ensemble \
      --config.data.manual_dir=../shared/data/mnist

workdir/results.json then holds the ensemble's test_accuracy and test_loss, and one record per
member; workdir/population.csv the same as a table. Measured: README.md "Results".
"""
from configs import augment


def get_config():
  config = augment.get_config()
  config.sweep.members = ('', 'model.batch_norm=True')  # as it is; with BatchNorm
  config.sweep.grid = 'seed=0,1,2'                       # three seeds of each
  config.sweep.select = 'ensemble'                       # the mean probabilities of all six
  return config
