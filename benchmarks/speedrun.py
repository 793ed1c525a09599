"""The speedrun side by side: configs/speedrun.py against its PyTorch peer, same seeds, same run.

  python benchmarks/speedrun.py --data ../shared/data/mnist --seeds 0,1,2,3,4

For each seed, one after the other: `launch.py --config=configs/speedrun.py` (a fresh process;
training seconds and test accuracy from its results.json) and benchmarks/speedrun_torch.py for
that seed (a fresh process; its own train_seconds, the steps only, and test accuracy). Both
count only the training steps (digitjax compiles before its first step, the peer runs untimed
warm-up steps on a throwaway model). The runs alternate so that a change in the machine's load
falls on both sides alike. The peer runs with --torch-args (default: channels-last on all
cores, its fastest setting when nothing else runs; on a busy machine OpenMP's spin-waiting
makes '--threads 1 --channels-last' the faster one: its docstring has the figures). Prints each
seed's accuracy and seconds on both sides, mean and min accuracy, mean seconds and their ratio,
and the load average before and after; --json writes the same.

Beside the training seconds, each side's whole process: the wall time of its subprocess, start
to exit (interpreter, imports, reading the data, digitjax's compile, the peer's warm-up steps,
training, the test evaluation, digitjax's checkpoint and results files): what a user waits for.
digitjax's compile is read from JAX's persistent cache when an earlier run left it there
(config.compilation_cache_dir), as it does for a user's second run.
"""
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from compare import ROOT, data_parser


def _run(cmd):
  """Runs cmd in a fresh process; returns its wall seconds, start to exit (imports, data,
  compile, training, evaluation and exit all included: what a user waits for)."""
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f'{" ".join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return seconds


def digitjax_seed(seed, data, data_dir, config, overrides):
  with tempfile.TemporaryDirectory() as workdir:
    process_seconds = _run([
        sys.executable, 'launch.py', f'--config={config}', f'--workdir={workdir}',
        f'--config.data.manual_dir={data}', f'--config.data.data_dir={data_dir}',
        f'--config.seed={seed}', '--config.plots=False', *overrides])
    with open(os.path.join(workdir, 'results.json')) as f:
      r = json.load(f)
  return {'seed': seed, 'test_accuracy': r['test_accuracy'], 'train_seconds': r['train_seconds'],
          'compile_seconds': r['compile_seconds'], 'process_seconds': process_seconds}


def torch_seed(seed, data, torch_args):
  with tempfile.TemporaryDirectory() as out:
    path = os.path.join(out, 'torch.json')
    process_seconds = _run([sys.executable, 'benchmarks/speedrun_torch.py', '--data', data,
                            '--seeds', str(seed), '--json', path, *torch_args])
    with open(path) as f:
      r = json.load(f)
  run = r['runs'][0]
  return {'seed': seed, 'test_accuracy': run['test_accuracy'],
          'train_seconds': run['train_seconds'], 'threads': r['threads'],
          'process_seconds': process_seconds}


def summary(runs):
  accs = [r['test_accuracy'] for r in runs]
  secs = [r['train_seconds'] for r in runs]
  whole = [r['process_seconds'] for r in runs]
  return {'mean_accuracy': statistics.fmean(accs), 'min_accuracy': min(accs),
          'mean_train_seconds': statistics.fmean(secs), 'max_train_seconds': max(secs),
          'mean_process_seconds': statistics.fmean(whole), 'max_process_seconds': max(whole),
          'all_at_least_0.99': min(accs) >= 0.99}


def main():
  parser = data_parser(__doc__)
  parser.add_argument('--seeds', default='0,1,2,3,4')
  parser.add_argument('--config', default='configs/speedrun.py')
  parser.add_argument('--override', action='append', default=[],
                      help='a digitjax config override, FIELD=VALUE (repeatable)')
  parser.add_argument('--torch-args', default='--channels-last',
                      help="speedrun_torch.py's options ('' for torch's default threads)")
  parser.add_argument('--json', help='write the results here')
  args = parser.parse_args()
  data = os.path.abspath(args.data)
  seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  overrides = [f'--config.{o}' for o in args.override]
  torch_args = shlex.split(args.torch_args)
  sys.path.insert(0, ROOT)
  from digitjax import data as data_lib
  data_lib.prepare('mnist', args.data_dir, data)  # one-off preparation, not timed

  load_start = os.getloadavg()
  ours, peer = [], []
  for seed in seeds:
    ours.append(digitjax_seed(seed, data, args.data_dir, args.config, overrides))
    peer.append(torch_seed(seed, data, torch_args))
    print(f'seed {seed}: digitjax {ours[-1]["test_accuracy"]:.4f} in '
          f'{ours[-1]["train_seconds"]:.2f} s (process {ours[-1]["process_seconds"]:.2f} s), '
          f'torch {peer[-1]["test_accuracy"]:.4f} in {peer[-1]["train_seconds"]:.2f} s '
          f'(process {peer[-1]["process_seconds"]:.2f} s)', file=sys.stderr, flush=True)
  load_end = os.getloadavg()

  a, b = summary(ours), summary(peer)
  print(f'{"seed":>5} {"digitjax acc":>13} {"digitjax s":>11} {"process s":>10} '
        f'{"torch acc":>10} {"torch s":>8} {"process s":>10}')
  for o, p in zip(ours, peer):
    print(f'{o["seed"]:>5} {o["test_accuracy"]:>13.4f} {o["train_seconds"]:>11.2f} '
          f'{o["process_seconds"]:>10.2f} {p["test_accuracy"]:>10.4f} '
          f'{p["train_seconds"]:>8.2f} {p["process_seconds"]:>10.2f}')
  print(f'{"mean":>5} {a["mean_accuracy"]:>13.4f} {a["mean_train_seconds"]:>11.2f} '
        f'{a["mean_process_seconds"]:>10.2f} {b["mean_accuracy"]:>10.4f} '
        f'{b["mean_train_seconds"]:>8.2f} {b["mean_process_seconds"]:>10.2f}')
  print(f'{"min":>5} {a["min_accuracy"]:>13.4f} {"":>11} {"":>10} {b["min_accuracy"]:>10.4f}')
  print(f'every seed >= 0.99: digitjax {a["all_at_least_0.99"]}, torch {b["all_at_least_0.99"]}; '
        f'torch / digitjax mean seconds: training '
        f'x{b["mean_train_seconds"] / a["mean_train_seconds"]:.2f}, whole process '
        f'x{b["mean_process_seconds"] / a["mean_process_seconds"]:.2f}')
  print(f'load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end '
        f'({os.cpu_count()} CPUs); torch {shlex.join(torch_args) or "(default threads)"}, '
        f'{peer[0]["threads"]} thread(s)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'digitjax': {'config': args.config, 'overrides': args.override, 'runs': ours,
                              **a},
                 'torch': {'args': torch_args, 'runs': peer, **b},
                 'load_average_start': load_start, 'load_average_end': load_end}, f, indent=2)


if __name__ == '__main__':
  main()
