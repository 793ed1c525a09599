"""configs/best.py's recipe for seeds 0 to 5, and the same recipe trained for 50 epochs in
bfloat16 for seeds 0 to 2, as one population delivering the mean probabilities of the nine.

Two groups, one program each: the six 25-epoch float32 members, then the three 50-epoch
bfloat16 ones. Each member computes, bit for bit, what its single run with
--config.data.split_seed=0 would (all nine share the base seed's validation holdout);
results.json has each member's figures and the ensemble's. The test split is read once, at the
end.

Chosen on validation only (docs/results.md "Session 6"): with 5 views the nine reach validation
accuracy 0.9968 against 0.9967 for the six 25-epoch members alone and 0.9962 for the three
50-epoch ones alone.

  python launch.py --config=configs/best_ensemble.py --workdir=runs/best_ensemble \
      --config.data.manual_dir=../shared/data/mnist
  python launch.py --workdir=runs/best_ensemble --mode=eval --checkpoint=latest --tta=5
"""
from configs import best

LONG = 'num_epochs=50.0; model.dtype="bfloat16"'  # 50 epochs in ~23 min here (27.5 s/epoch)


def get_config():
  config = best.get_config()
  config.sweep.members = (tuple(f'seed={s}' for s in range(6))
                          + tuple(f'{LONG}; seed={s}' for s in range(3)))
  config.sweep.select = 'ensemble'     # the mean probabilities of the nine
  return config
