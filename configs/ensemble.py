"""Four seeds of the tutorial's CNN trained at once (one vmapped program) and averaged.

Member i trains with seed 0+i (its own initialization, augmentation and example order) on the
validation holdout of seed 0; the ensemble predicts the mean of the members' softmax
probabilities. With augmentation each member sees 15 epochs of randomly rotated, zoomed and
shifted digits, under a one-cycle schedule that anneals to ~0 so that each member ends in a
settled minimum.

  python launch.py --config=configs/ensemble.py --workdir=runs/ensemble \
      --config.data.manual_dir=../shared/data/mnist

results.json then holds the ensemble's test_accuracy and test_loss, and member_test_accuracy
(one entry per member) with its mean and standard deviation over the four seeds.

Measured on a 2-core x86 CPU (jax 0.10.2): RUNTIME; accuracy not measured yet.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.ensemble_size = 4             # members with seeds seed, seed+1, seed+2, seed+3
  config.augment.enabled = True        # random rotation, zoom and shift on device, per member
  config.batch_size = 64               # more steps than fast.py's 128: augmentation needs them
  config.num_epochs = 15.0             # passes over the 54,000 training images, per member
  config.learning_rate = 0.05          # the one-cycle peak
  config.schedule = 'onecycle'         # warm up for 30% of the steps, then anneal to ~0
  config.nesterov = True               # Nesterov momentum 0.9
  config.weight_decay = 5e-4           # mild L2: long training with a high peak rate
  return config
