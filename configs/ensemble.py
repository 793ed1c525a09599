"""Three seeds of configs/augment.py's recipe trained at once (one vmapped program) and averaged.

Each member follows configs/augment.py exactly (on-device rotation, zoom and shift; weight
decay 5e-4; one warmup epoch, then cosine decay from 0.05 to 0; Nesterov; batch 64; 15 epochs).
Member i uses seed `seed + i` (its own initialization, augmentation and example order) on
the validation holdout of data.split_seed; the ensemble predicts the mean of the members' softmax
probabilities. Because the recipe is the same, the members' accuracies are also the multi-seed
statistics of configs/augment.py.

  python launch.py --config=configs/ensemble.py --workdir=runs/ensemble \
      --config.data.manual_dir=../shared/data/mnist

results.json then holds the ensemble's test_accuracy and test_loss, and member_test_accuracy
(one entry per member) with its mean and standard deviation. Measured: README.md "Results".
"""
from configs import augment


def get_config():
  config = augment.get_config()
  config.ensemble_size = 3             # members with seeds seed, seed+1, seed+2
  return config
