"""Six members as one population delivering their mean probabilities, evaluated with 5 views:
configs/best.py (stroke-width changes, 25 epochs in float32), seeds 0 to 2, and the same recipe
without stroke-width changes for 50 epochs in bfloat16, seeds 0 to 2.

Each member computes, bit for bit, what its single run with --config.data.split_seed=0 would
(all six share the base seed's validation holdout); results.json has each member's figures
and the ensemble's. The test split is read once, at the end.

Chosen on validation only, by session 7's rule (docs/results.md): half clean validation
accuracy, half the mean validation accuracy under the 10 stresses of benchmarks/robustness.py,
among five candidates (session 5's six 25-epoch members, session 6's three 50-epoch bfloat16
members, those nine, the three stroke-change members, and these six), each plain and with 5
views. These six with 5 views scored highest: 0.9946 (clean 0.9967, stresses 0.9925); the three
50-epoch members that session 6 chose on clean validation alone scored 0.9937.

  python launch.py --config=configs/best_ensemble.py --workdir=runs/best_ensemble \
      --config.data.manual_dir=../shared/data/mnist
  python launch.py --workdir=runs/best_ensemble --mode=eval --checkpoint=latest --tta=5
"""
from configs import best


def get_config():
  config = best.get_config()
  bfloat16_50 = 'num_epochs=50.0; model.dtype="bfloat16"; augment.stroke=0.0'
  config.sweep.members = tuple(f'seed={s}' for s in range(3)) + tuple(
      f'{bfloat16_50}; seed={s}' for s in range(3))  # ~23 min each in bfloat16 (27.5 s an epoch)
  config.sweep.select = 'ensemble'     # the mean probabilities of the six
  return config
