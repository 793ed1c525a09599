"""K seeds trained at once with jax.vmap vs the same K seeds trained one after another.

  python benchmarks/ensemble.py --data ../shared/data/mnist --members 4

Runs, as separate `launch.py` processes on the same machine: one job with
`--config.ensemble_size=K`, then K single-model jobs with seeds 0..K-1 (the same recipe, the same
training subset and epochs; each with the package's 'auto' settings). Prints the training seconds (steps only, from results.json) and the
whole jobs' wall time of both, and their ratio. Extra `--config.*` overrides apply to
every job (e.g. `--config.grad_chunks=1`).
"""
import argparse
import json
import os
import sys
import tempfile

from compare import ROOT, run_process  # benchmarks/compare.py: same child-process timing


def job(data, data_dir, config, extra):
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, 'launch.py', f'--config={config}', f'--workdir={workdir}',
           f'--config.data.manual_dir={data}', f'--config.data.data_dir={data_dir}',
           '--config.plots=False', *extra]
    wall, _, _ = run_process(cmd)
    with open(os.path.join(workdir, 'results.json')) as f:
      return wall, json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', default=os.path.join(ROOT, '..', 'shared', 'data', 'mnist'))
  parser.add_argument('--data-dir', default=os.path.join(tempfile.gettempdir(), 'digitjax_bench_tfds'))
  parser.add_argument('--config', default='configs/augment.py')
  parser.add_argument('--members', type=int, default=4)
  parser.add_argument('--train-examples', type=int, default=12000)
  parser.add_argument('--epochs', type=float, default=2.0)
  args, overrides = parser.parse_known_args()
  if any(not o.startswith('--config.') for o in overrides):
    parser.error(f'unknown arguments {overrides}: only --config.FIELD=VALUE overrides pass on')
  data = os.path.abspath(args.data)
  common = [f'--config.data.max_train_examples={args.train_examples}',
            f'--config.num_epochs={args.epochs}', *overrides]
  sys.path.insert(0, ROOT)
  from digitjax import data as data_lib
  data_lib.prepare('mnist', args.data_dir, data)  # one-off preparation, not timed

  wall_v, res_v = job(data, args.data_dir, args.config,
                      common + [f'--config.ensemble_size={args.members}'])
  singles = [job(data, args.data_dir, args.config, common + [f'--config.seed={s}'])
             for s in range(args.members)]
  train_s = sum(r['train_seconds'] for _, r in singles)
  wall_s = sum(w for w, _ in singles)
  print(f'vmap K={args.members}: train {res_v["train_seconds"]:.1f} s, job {wall_v:.1f} s, '
        f'test accuracy {res_v["test_accuracy"]:.4f} (members {res_v["member_test_accuracy"]})')
  each = ', '.join(f"{r['train_seconds']:.1f}" for _, r in singles)
  print(f'{args.members} sequential: train {train_s:.1f} s ({each}), jobs {wall_s:.1f} s, '
        f'test accuracy {[r["test_accuracy"] for _, r in singles]}')
  print(f'vmap / sequential: train x{res_v["train_seconds"] / train_s:.2f}, '
        f'jobs x{wall_v / wall_s:.2f}')


if __name__ == '__main__':
  main()
