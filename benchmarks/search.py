"""Grid, halving and PBT at equal member-steps: the validation-chosen member's test accuracy.

  python benchmarks/search.py --data ../shared/data/mnist                  # 3 repeats each
  python benchmarks/search.py --repeats 1 --epochs 1 --train-examples 12000   # a quick look

Each repeat r (seed r) runs, as separate `launch.py` processes one after another:
- grid: configs/sweep.py's learning rates (0.003, 0.01, 0.03, 0.1) at momentum 0.9, seed r:
  4 members;
- halving: configs/halving.py (4 slots, ASHA with eta 2), seed r;
- pbt: configs/search.py (4 slots, exploit/explore every quarter epoch), seed r;
all with the same epochs, so every population trains 4 x epochs x steps-per-epoch member-steps.
Each delivers its best member by validation only (grid: validation accuracy, as configs/sweep.py;
searches: their metric, validation loss). Prints, per kind, the delivered member's test accuracy
(mean and spread over the repeats), its validation figure, the member-steps, and the seconds
of the whole job; then, for each search, the delivered numbers replayed from scratch as a
single run (found_config.py) and its test accuracy, when --replay is given.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from compare import ROOT, data_parser

KINDS = {
    'grid': ('configs/sweep.py', ["--config.sweep.grid=learning_rate=0.003,0.01,0.03,0.1"]),
    'halving': ('configs/halving.py', []),
    'pbt': ('configs/search.py', []),
}


def job(config: str, workdir: str, args) -> tuple[float, dict]:
  """(wall seconds, results.json) of one launch.py job."""
  cmd = [sys.executable, 'launch.py', f'--config={config}', f'--workdir={workdir}',
         f'--config.data.manual_dir={args.data}', f'--config.data.data_dir={args.data_dir}',
         *args.common]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  with open(os.path.join(workdir, 'results.json')) as f:
    return wall, json.load(f)


def one(kind: str, seed: int, root: str, args) -> dict:
  config, extra = KINDS[kind]
  workdir = os.path.join(root, f'{kind}-{seed}')
  wall, r = job(config, workdir, args.__class__(**{
      **vars(args), 'common': [*args.common, f'--config.seed={seed}', *extra]}))
  chosen = next(m for m in r['members'] if m['selected'])
  row = {'kind': kind, 'seed': seed, 'test_accuracy': r['test_accuracy'],
         'test_loss': r['test_loss'], 'val_accuracy': r['val_accuracy'],
         'val_loss': r['val_loss'], 'member': chosen['name'],
         'member_steps': r['cost']['member_steps'], 'seconds': wall, 'workdir': workdir}
  if args.replay and r.get('found_config'):
    found = os.path.join(workdir, r['found_config'])
    _, replay = job(found, workdir + '-replay', args)
    row['replay_test_accuracy'] = replay['test_accuracy']
  print(json.dumps(row), flush=True)
  return row


def table(rows: list[dict]) -> str:
  lines = ['| kind | test accuracy (mean +- sd) | each seed | val loss (mean) | member-steps '
           '| seconds (mean) | replayed from scratch |', '|---|---|---|---|---|---|---|']
  for kind in KINDS:
    got = [r for r in rows if r['kind'] == kind]
    if not got:
      continue
    acc = [r['test_accuracy'] for r in got]
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    replay = [r['replay_test_accuracy'] for r in got if 'replay_test_accuracy' in r]
    lines.append(
        f'| {kind} | {statistics.mean(acc):.4f} +- {sd:.4f} | '
        f'{", ".join(f"{a:.4f}" for a in acc)} | '
        f'{statistics.mean(r["val_loss"] for r in got):.4f} | {got[0]["member_steps"]:,} | '
        f'{statistics.mean(r["seconds"] for r in got):.0f} | '
        f'{", ".join(f"{a:.4f}" for a in replay) or "-"} |')
  return '\n'.join(lines)


def main():
  parser = data_parser(__doc__)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--kinds', default='grid,halving,pbt')
  parser.add_argument('--epochs', type=float, default=None, help="default: the configs' (2)")
  parser.add_argument('--train-examples', type=int, default=0, help='0: all')
  parser.add_argument('--replay', action='store_true',
                      help="also train each search's found_config.py from scratch")
  parser.add_argument('--workdir', default=None, help='default: a temporary folder')
  parser.add_argument('--json', help='write the rows here')
  args, overrides = parser.parse_known_args()
  if any(not o.startswith('--config.') for o in overrides):
    parser.error(f'unknown arguments {overrides}: only --config.FIELD=VALUE overrides pass on')
  args.data = os.path.abspath(args.data)
  args.common = ['--config.plots=False',
                 f'--config.data.max_train_examples={args.train_examples}', *overrides]
  if args.epochs is not None:
    args.common.append(f'--config.num_epochs={args.epochs}')
  root = args.workdir or tempfile.mkdtemp(prefix='digitjax_search_')
  rows = [one(kind, seed, root, args) for seed in range(args.repeats)
          for kind in args.kinds.split(',')]
  print(table(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
