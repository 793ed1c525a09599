"""Six models in two variants: three seeds of configs/augment.py's recipe as it is and three with
BatchNorm, each variant trained at once (one vmapped program), all six averaged.

Each member follows configs/augment.py (on-device rotation, zoom and shift; weight decay 5e-4;
one warmup epoch, then cosine decay from 0.05 to 0; Nesterov; batch 64; 15 epochs) with the
tutorial's layers, the second variant with BatchNorm after each conv layer and the hidden dense
layer (model.batch_norm). Member i of a variant uses seed `seed + i` (its own initialization,
augmentation and example order) on the validation holdout of data.split_seed; the ensemble
predicts the mean of the six members' softmax probabilities. Variant i trains (and resumes) in
workdir/variant<i> like any run; workdir/results.json holds the ensemble's figures.

  python launch.py --config=configs/ensemble.py --workdir=runs/ensemble \
      --config.data.manual_dir=../shared/data/mnist

results.json then holds the ensemble's test_accuracy and test_loss, member_test_accuracy (one
entry per member, variant by variant) with its mean and standard deviation, and each variant's
own figures under `variants`. Measured, and the ensembles tried before: README.md "Results".
"""
from configs import augment


def get_config():
  config = augment.get_config()
  config.ensemble_size = 3             # members with seeds seed, seed+1, seed+2, per variant
  config.ensemble_variants = ('', 'model.batch_norm=True')  # as it is; with BatchNorm
  return config
