"""Four seeds of the tutorial's CNN trained at once (one vmapped program) and averaged.

Each member follows configs/augment.py's recipe (on-device rotation, zoom and shift; dropout
0.25; one warmup epoch, then cosine decay from 0.05 to 0; Nesterov; batch 64), run for 15 epochs
since augmented data keeps improving for longer. Member i uses seed 0+i (its own
initialization, augmentation, dropout and example order) on the validation holdout of seed 0;
the ensemble predicts the mean of the members' softmax probabilities.

  python launch.py --config=configs/ensemble.py --workdir=runs/ensemble \
      --config.data.manual_dir=../shared/data/mnist

results.json then holds the ensemble's test_accuracy and test_loss, and member_test_accuracy
(one entry per member) with its mean and standard deviation over the four seeds.

Measured on a 2-core x86 CPU (jax 0.10.2), on a 12,000-image subset with another job running:
~104 ms per step of the four members, so ~90 s per epoch and ~25 min for the 15 epochs.
Accuracy not measured yet (2 epochs on the subset: ensemble 0.9837, members 0.979-0.982).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.ensemble_size = 4             # members with seeds seed, seed+1, seed+2, seed+3
  config.augment.enabled = True        # random affine per image, keys from (member seed, step)
  config.model.dropout_rate = 0.25     # before each dense layer, training only
  config.batch_size = 64               # steps of 64 images, per member
  config.num_epochs = 15.0             # passes over the 54,000 training images, per member
  config.learning_rate = 0.05          # cosine peak
  config.schedule = 'cosine'           # one warmup epoch, then cosine decay to 0
  config.warmup_epochs = 1.0           # linear warmup from 0
  config.nesterov = True               # Nesterov momentum 0.9
  return config
