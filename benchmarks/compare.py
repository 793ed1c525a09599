"""digitjax vs the Keras tutorial, one epoch of the tutorial recipe, same machine, same run.

  python benchmarks/compare.py --data ../shared/data/mnist --repeats 3
  python benchmarks/compare.py --pipelines device,device+model.dtype=bfloat16 \
      --keras-policies float32,mixed_bfloat16 --repeats 5      # both precisions, both sides

Each repeat runs, as separate processes: the Keras tutorial job (benchmarks/keras_tutorial.py)
once per Keras dtype policy, and `launch.py` with configs/default.py for one epoch, once per
input pipeline (each with its config overrides). Reported per
framework (medians over repeats): training images/s (steps after compilation only), s/epoch (the
epoch's steps, no validation; Keras's includes its first step, which compiles), compile seconds,
seconds from process start to the first finished step, the whole job's wall time (start,
imports, data, compile, train, validate, checkpoint, test, save), and peak RSS. tfds prepares
MNIST once before the timed runs (a one-off, like Keras's download).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_IMAGES = 54000


def run_process(cmd, env=None):
  """(wall seconds, stdout, stderr) of one child process; it reports its own peak RSS."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)
  out, err = proc.communicate()
  wall = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f'{cmd[1]} failed ({proc.returncode}):\n{err[-3000:]}')
  return wall, out, err


def keras_run(data, policy='float32'):
  with tempfile.TemporaryDirectory() as out:
    cmd = ['/usr/bin/env', 'python3', '-c',
           'import resource, runpy, sys, json; sys.argv = sys.argv[1:]; '
           'runpy.run_path(sys.argv[0], run_name="__main__"); '
           'print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))',
           'benchmarks/keras_tutorial.py', '--data', data, '--epochs', '1', '--out', out,
           '--policy', policy]
    wall, stdout, _ = run_process(cmd)
  lines = [json.loads(l) for l in stdout.splitlines() if l.startswith('{')]
  r = {**lines[0], **lines[1]}
  # Keras's first step traces and compiles; digitjax compiles before its first step. So both
  # rates count the steps after compilation: Keras's from its second step (the first batch of
  # 32 left out), digitjax's from its first.
  steady_seconds = r['steady_step_ms'] * (r['steps'] - 1) / 1000
  return {'images_per_s': (TRAIN_IMAGES - 32) / steady_seconds, 'epoch_seconds': r['train_seconds'],
          'steady_step_ms': r['steady_step_ms'], 'compile_seconds': r['first_step_seconds'],
          'start_to_first_step_seconds': r['start_to_first_step_seconds'], 'job_seconds': wall,
          'peak_rss_mib': r['peak_rss_mib'], 'test_accuracy': r['test_accuracy']}


def digitjax_run(data, data_dir, pipeline, extra=()):
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, '-c',
           'import resource, runpy, sys; sys.argv = sys.argv[1:]\n'
           'try:\n  runpy.run_path(sys.argv[0], run_name="__main__")\n'
           'finally:\n  print("PEAK_RSS_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)',
           'launch.py', '--config=configs/default.py', f'--workdir={workdir}',
           f'--config.data.manual_dir={data}', f'--config.data.data_dir={data_dir}',
           '--config.num_epochs=1', '--config.plots=False', f'--config.input_pipeline={pipeline}',
           *extra]
    wall, stdout, _ = run_process(cmd)
    with open(os.path.join(workdir, 'results.json')) as f:
      r = json.load(f)
  rss = float(stdout.rsplit('PEAK_RSS_MIB', 1)[1].split()[0])
  steps = TRAIN_IMAGES // r['config']['batch_size']
  return {'images_per_s': steps * r['config']['batch_size'] / r['train_seconds'],
          'epoch_seconds': r['train_seconds'],
          'steady_step_ms': 1000 * r['train_seconds'] / steps,
          'compile_seconds': r['compile_seconds'],
          'start_to_first_step_seconds': r['start_to_first_step_seconds'], 'job_seconds': wall,
          'peak_rss_mib': rss, 'test_accuracy': r['test_accuracy']}


def data_parser(doc: str) -> argparse.ArgumentParser:
  """A benchmark's parser with --data (the MNIST IDX files) and --data-dir (tfds's prepared
  copy, shared by every benchmark)."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument('--data', default=os.path.join(ROOT, '..', 'shared', 'data', 'mnist'))
  parser.add_argument('--data-dir', default=os.path.join(tempfile.gettempdir(),
                                                         'digitjax_bench_tfds'))
  return parser


def main():
  parser = data_parser(__doc__)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--pipelines', default='device,tfds',
                      help='comma-separated input pipelines to time; each may carry config '
                           'overrides after "+", e.g. tfds+grad_chunks=1+model.conv_impl=im2col')
  parser.add_argument('--keras-policies', default='float32',
                      help="comma-separated Keras dtype policies to time, e.g. "
                           "float32,mixed_bfloat16")
  parser.add_argument('--skip-keras', action='store_true')
  args = parser.parse_args()
  data = os.path.abspath(args.data)
  sys.path.insert(0, ROOT)
  from digitjax import data as data_lib
  data_lib.prepare('mnist', args.data_dir, data)  # one-off preparation, not timed

  runs = {}
  load_start = os.getloadavg()
  for repeat in range(args.repeats):
    if not args.skip_keras:
      for policy in args.keras_policies.split(','):
        name = 'keras' if policy == 'float32' else f'keras[{policy}]'
        runs.setdefault(name, []).append(keras_run(data, policy))
    for variant in args.pipelines.split(','):
      pipeline, *overrides = variant.split('+')
      runs.setdefault(f'digitjax[{variant}]', []).append(digitjax_run(
          data, args.data_dir, pipeline, [f'--config.{o}' for o in overrides]))
    print(f'repeat {repeat + 1}/{args.repeats} done', file=sys.stderr, flush=True)

  keys = ['images_per_s', 'epoch_seconds', 'steady_step_ms', 'compile_seconds',
          'start_to_first_step_seconds', 'job_seconds', 'peak_rss_mib', 'test_accuracy']
  med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
  spread = {name: {k: (min(r[k] for r in rs), max(r[k] for r in rs)) for k in keys}
            for name, rs in runs.items()}
  width = max(18, *(len(name) + 2 for name in med))
  print(f"{'':<{width}}" + ''.join(f'{k[:14]:>16}' for k in keys))
  for name in med:
    print(f'{name:<{width}}' + ''.join(f'{med[name][k]:>16.3f}' for k in keys))
  for keras in (n for n in med if n.startswith('keras')):
    for name in (n for n in med if not n.startswith('keras')):
      print(f'{name} / {keras}: images/s x{med[name]["images_per_s"] / med[keras]["images_per_s"]:.2f}, '
            f'job x{med[keras]["job_seconds"] / med[name]["job_seconds"]:.2f} faster')
  load_end = os.getloadavg()
  print(f'load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end '
        f'({os.cpu_count()} CPUs; the runs share them with whatever else runs)')
  print(json.dumps({'median': med, 'min_max': spread, 'repeats': args.repeats,
                    'load_average_start': load_start, 'load_average_end': load_end}))


if __name__ == '__main__':
  main()
