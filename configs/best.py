"""The best single model chosen on validation only (issue 27): configs/augment.py's recipe with
weight averaging and a deeper CNN with BatchNorm and dropout, evaluated with test-time views.

configs/augment.py (on-device rotation +-10 deg, zoom 0.1, shift 0.1; weight decay 5e-4; one
warmup epoch, then cosine from 0.05; Nesterov; batch 64; 15 epochs) plus:
- ema_decay 0.999: the EMA of the weights is the delivered model (validation loss 0.01371
  against the raw weights' 0.01380, seed 0, the tutorial's layers);
- the layers Conv32-Conv32-Pool-Conv64-Conv64-Pool-Dense128, BatchNorm after each, dropout 0.2
  (session 4: validation loss 0.0126; with dropout 0.4 0.0149; the tutorial's layers 0.01371;
  the wide tutorial CNN, 64/128/128 for 25 epochs, 0.0130 at 4x the cost per epoch);
- 25 epochs instead of 15 (session 5: validation 0.9972 / 0.0103 with 5 views against 0.9960 /
  0.0122 at 15, seed 0; 961 s of training here);
- eval and predict with test-time views (--tta=N, chosen on validation: docs/results.md);
- stroke-width changes (augment.stroke 0.25), chosen by session 7's rule.
Until session 6 the rule was validation loss (the search's metric), seed 0, 15 epochs, one run
per ingredient; it left out elastic distortion (alpha 17, sigma 4: 0.0148), stroke-width
changes (p 0.25: 0.0162) and label smoothing 0.1 (docs/results.md "A record chosen on
validation"); the numbers of configs/best_search.py's PBT search (6 epochs) were not replayed.
Session 7's rule, declared before the runs it judged, weighs clean validation accuracy and the
mean validation accuracy under the 10 stresses of benchmarks/robustness.py alike, mean of seeds
0-2 (docs/results.md "Session 7"): with stroke-width changes 0.9938 (clean 0.9961, stresses
0.9916, 5 views), without 0.9928 (clean 0.9968, stresses 0.9888).
Every choice was made on the 6,000 validation images (each run printed its test figure too; none
was used to choose).

  python launch.py --config=configs/best.py --workdir=runs/best --config.seed=S \
      --config.data.split_seed=0 --config.data.manual_dir=../shared/data/mnist
  python launch.py --workdir=runs/best --mode=eval --checkpoint=latest --tta=5

configs/best_ensemble.py trains seeds 0-2 of it and three 50-epoch bfloat16 members without
stroke-width changes as one population and delivers their mean (chosen by the same rule).
"""
from configs import augment


def get_config():
  config = augment.get_config()
  config.ema_decay = 0.999             # the delivered model is the weights' moving average
  # Conv32-Conv32-Pool-Conv64-Conv64-Pool-Dense128 with BatchNorm and dropout 0.2 (197,802
  # parameters; validation loss 0.0126 against the tutorial's layers' 0.01371, seed 0).
  config.model.conv_features = (32, 32, 64, 64)
  config.model.pool_after = (1, 3)
  config.model.dense_features = 128
  config.model.batch_norm = True
  config.model.dropout_rate = 0.2
  config.num_epochs = 25.0             # validation loss still falling at 15 (0.0122 -> 0.0103)
  # Strokes thickened or thinned by one pixel, each with probability 0.25: chosen by session 7's
  # rule, clean and stressed validation alike (score 0.9938 against 0.9928, seeds 0-2).
  config.augment.stroke = 0.25
  return config
