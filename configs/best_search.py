"""The search behind configs/best.py: population-based training of configs/augment.py's recipe,
4 slots for 6 epochs, over the numbers that recipe leaves to taste.

Each slot trains configs/augment.py's recipe (the tutorial's CNN, on-device rotation/zoom/shift,
weight decay, one warmup epoch then cosine, Nesterov, batch 64) for 6 epochs instead of 15.
Every epoch (844 steps) the slots are scored on validation loss; the worst quarter copies the
weights, optimizer state and numbers of one of the best quarter and perturbs them (x0.8 or
x1.2; 1 time in 4 drawn anew). Searched: the cosine's peak learning rate, the weight decay,
label smoothing and the rotation range. The test split is not looked at: the population
delivers its best slot by validation loss, and found_config.py in the workdir replays its
numbers as one run. Cost: 24 epochs of the tutorial's CNN (4 slots x 6 epochs).

  python launch.py --config=configs/best_search.py --workdir=runs/best_search \
      --config.data.manual_dir=../shared/data/mnist

What it found and how configs/best.py uses it: docs/results.md "A record chosen on validation".
"""
from configs import augment


def get_config():
  config = augment.get_config()
  config.num_epochs = 6.0
  config.search.kind = 'pbt'
  config.search.space = ('learning_rate=loguniform(0.02,0.12); weight_decay=loguniform(1e-4,2e-3); '
                         'label_smoothing=uniform(0,0.2); augment.rotation=uniform(5,20)')
  config.search.size = 4
  config.search.ready_steps = 844                 # one epoch of 54,000 images in steps of 64
  config.search.metric = 'val_loss'
  config.sweep.select = 'best'                     # by validation loss (the metric)
  return config
