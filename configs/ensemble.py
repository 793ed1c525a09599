"""Three seeds of configs/augment.py's recipe with twice as many conv channels, trained at once
(one vmapped program) and averaged.

Each member follows configs/augment.py (on-device rotation, zoom and shift; weight decay 5e-4;
one warmup epoch, then cosine decay from 0.05 to 0; Nesterov; batch 64; 15 epochs) with conv
layers of 64, 128 and 128 channels (427,990 parameters a member; the dense layers as in the
tutorial). Member i uses seed `seed + i` (its own initialization, augmentation and example
order) on the validation holdout of data.split_seed; the ensemble predicts the mean of the
members' softmax probabilities.

  python launch.py --config=configs/ensemble.py --workdir=runs/ensemble \
      --config.data.manual_dir=../shared/data/mnist

results.json then holds the ensemble's test_accuracy and test_loss, and member_test_accuracy
(one entry per member) with its mean and standard deviation. Measured (~46 minutes of training
on a 2-core CPU) and the variants tried: README.md "Results".
"""
from configs import augment


def get_config():
  config = augment.get_config()
  config.model.conv_features = (64, 128, 128)  # twice the tutorial's channels
  config.ensemble_size = 3             # members with seeds seed, seed+1, seed+2
  return config
