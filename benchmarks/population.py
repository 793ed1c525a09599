"""A population trained by one command vs its members trained as separate single runs.

  python benchmarks/population.py --data ../shared/data/mnist                 # configs/sweep.py
  python benchmarks/population.py --data ../shared/data/mnist --config configs/augment.py \
      --grid 'seed=0,1,2' --train-examples 12000 --epochs 2 --executions map,vmap

Runs, as separate `launch.py` processes on the same machine, one after another: the population
(`--config` with `--config.sweep.grid=GRID`) once per execution in `--executions` ('auto' is the
package's choice: 'map' on CPU), and each member as its own single run (the same config with the
member's overrides and the population's validation holdout); `--repeats N` does both N times,
the order alternating, and gives the median ratios. Prints the training seconds (steps
only, from results.json) and whole jobs' wall time of each, their ratios, and whether each
member's test loss equals its single run's (they do, bit for bit, under 'map'). Extra
`--config.*` overrides apply to every job.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from compare import ROOT, data_parser


def job(data, data_dir, config, extra, workdir):
  """(wall seconds, results.json) of one launch.py job; a single run that diverges (its loss
  non-finite, as a population member may) gives {'diverged': ...} instead of results."""
  cmd = [sys.executable, 'launch.py', f'--config={config}', f'--workdir={workdir}',
         f'--config.data.manual_dir={data}', f'--config.data.data_dir={data_dir}',
         '--config.plots=False', *extra]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - start
  last = (proc.stderr.strip().splitlines() or [''])[-1]
  if proc.returncode == 2 and 'non-finite' in last:
    return wall, {'diverged': last}
  if proc.returncode:
    sys.exit(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  with open(os.path.join(workdir, 'results.json')) as f:
    return wall, json.load(f)


def main():
  parser = data_parser(__doc__)
  parser.add_argument('--config', default='configs/sweep.py')
  parser.add_argument('--grid', default=None, help="config.sweep.grid (default: the config's)")
  parser.add_argument('--train-examples', type=int, default=0, help='0: all')
  parser.add_argument('--epochs', type=float, default=None, help="default: the config's")
  parser.add_argument('--executions', default='auto', help='e.g. map,vmap')
  parser.add_argument('--repeats', type=int, default=1,
                      help='population and single runs, this many times, the order alternating')
  parser.add_argument('--json', help='write the figures here')
  args, overrides = parser.parse_known_args()
  if any(not o.startswith('--config.') for o in overrides):
    parser.error(f'unknown arguments {overrides}: only --config.FIELD=VALUE overrides pass on')
  data = os.path.abspath(args.data)
  common = [f'--config.data.max_train_examples={args.train_examples}', *overrides]
  if args.epochs is not None:
    common.append(f'--config.num_epochs={args.epochs}')
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import importlib
  from digitjax import data as data_lib, members as members_lib
  data_lib.prepare('mnist', args.data_dir, data)  # one-off preparation, not timed
  config = importlib.import_module(os.path.splitext(os.path.basename(args.config))[0]).get_config()
  if args.grid is not None:
    config.sweep.grid = args.grid
    common.append(f'--config.sweep.grid={args.grid}')
  members = members_lib.members_of(config, '/unused')
  figures = {'members': [m.name for m in members], 'repeats': []}

  def populations(root, r):
    out = {}
    for execution in args.executions.split(','):
      wall, res = job(data, args.data_dir, args.config,
                      common + [f'--config.sweep.execution={execution}'],
                      os.path.join(root, f'population-{execution}-{r}'))
      seconds = [m['train_seconds'] or 0.0 for m in res['members']]
      out[execution] = {
          'job_seconds': wall, 'population_seconds': res['train_seconds'],
          'train_seconds': max(seconds) if execution == 'vmap' else sum(seconds),
          'diverged': [m['name'] for m in res['members'] if m['diverged_at_step'] is not None],
          'test_loss': [m['test_loss'] for m in res['members']],
          'test_accuracy': [m['test_accuracy'] for m in res['members']]}
    return out

  def singles(root, r):
    out = []
    for i, m in enumerate(members):
      single = [f'--config.{k}={members_lib.format_value(v)}' for k, v in m.overrides.items()]
      wall, res = job(data, args.data_dir, args.config,
                      [c for c in common if not c.startswith('--config.sweep.grid=')] + single +
                      ['--config.sweep.grid=', f'--config.data.split_seed={config.seed}'],
                      os.path.join(root, f'single{i}-{r}'))
      out.append({'name': m.name, 'job_seconds': wall, 'train_seconds': res.get('train_seconds'),
                  'test_loss': res.get('test_loss'), 'test_accuracy': res.get('test_accuracy')})
    return out

  with tempfile.TemporaryDirectory() as root:
    for r in range(args.repeats):  # the order alternates, so a load that drifts falls on both
      if r % 2 == 0:
        p, s_ = populations(root, r), singles(root, r)
      else:
        s_, p = singles(root, r), populations(root, r)
      figures['repeats'].append({'populations': p, 'singles': s_})

  print(f'{len(members)} members ({", ".join(figures["members"][:3])}, ...), '
        f'{args.repeats} repeat(s), order alternating')
  ratios = {}
  for r, rep in enumerate(figures['repeats']):
    single = rep['singles']
    train_s, wall_s = (sum(s[k] or 0.0 for s in single) for k in ('train_seconds', 'job_seconds'))
    print(f'[{r}] {len(members)} single runs: train {train_s:.1f} s, jobs {wall_s:.1f} s')
    diverged = [s['name'] for s in single if s['test_loss'] is None]
    if diverged:
      print(f'[{r}] diverged as single runs (non-finite loss): {", ".join(diverged)}')
    for execution, p in rep['populations'].items():
      pairs = [(a, s['test_loss']) for a, s in zip(p['test_loss'], single)
               if a is not None and s['test_loss'] is not None]
      same = sum(a == b for a, b in pairs)
      close = max((abs(a - b) for a, b in pairs), default=0.0)
      ratios.setdefault(execution, []).append((p['train_seconds'] / train_s,
                                               p['job_seconds'] / wall_s))
      print(f'[{r}] population ({execution}): train {p["train_seconds"]:.1f} s (x'
            f'{p["train_seconds"] / train_s:.2f} of the single runs), job '
            f'{p["job_seconds"]:.1f} s (x{p["job_seconds"] / wall_s:.2f}); test loss equal to '
            f'the single run\'s for {same} of {len(pairs)} members that both finished (largest '
            f'difference {close:.2e})'
            + (f'; diverged: {", ".join(p["diverged"])}' if p['diverged'] else ''))
  for execution, values in ratios.items():
    train, job_ = zip(*values)
    print(f'population ({execution}) / single runs, median of {len(values)}: train '
          f'x{statistics.median(train):.2f}, whole jobs x{statistics.median(job_):.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=2)


if __name__ == '__main__':
  main()
