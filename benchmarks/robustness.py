"""Accuracy of trained workdirs on synthetic shifts of distribution, side by side.

  python benchmarks/robustness.py --workdir runs/default runs/augment
  python benchmarks/robustness.py --workdir runs/best --tta 5 --json robustness.json
  python benchmarks/robustness.py --workdir runs/default --stress thick,thin,off_centre
  python benchmarks/robustness.py --workdir runs/a runs/b --split validation
  python benchmarks/robustness.py --workdir runs/best --split uci_digits --stress thin --tta 5
  python benchmarks/robustness.py --workdir runs/a runs/b --combine --split validation --tta 5

Each workdir's model (what it delivers, as --mode=eval uses it: --checkpoint best unless told,
its EMA if it kept one, a population's selection) is evaluated on the 10,000 test images (or
--split validation's held-out images: robustness judged without the test split; or --split
uci_digits: 1,797 digits of 13 writers who are not MNIST's, data.uci_digits) as they are
('clean') and under each stress of digitjax/augment.py's STRESSES (thicker and thinner strokes,
slant, off-centre, rotation, smaller and larger): fixed transforms, no random numbers, so every
run sees the same images. Prints a Markdown table, one row per stress and one column per
workdir, then the mean over the stresses and the score (clean + that mean) / 2; --json writes
every figure (accuracy and loss) to a file; --picture draws the first images of the split under
each stress. --member measures one member of each population; --combine measures the members
of every workdir as one ensemble, one column (docs/results.md "Session 7" chose among such
ensembles). Writes nothing into the workdirs. A problem a user can fix (a workdir without a
checkpoint, an unknown stress or split, workdirs of other holdouts combined) is one line
`error: ...` on stderr and exit status 2.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', nargs='+', required=True, help='trained workdirs, one column '
                      'each')
  parser.add_argument('--stress', default='all', help='all, or names separated by commas')
  parser.add_argument('--checkpoint', default='best', help="'best', 'latest' or a step")
  parser.add_argument('--split', default='test', help="'test'; 'validation' to choose "
                      "without looking at the test split; 'uci_digits', other writers' digits")
  parser.add_argument('--member', default=None, help="a population's member (index or name) "
                      "instead of what it delivers, in every workdir")
  parser.add_argument('--combine', action='store_true', help="one column: every workdir's "
                      "members as one ensemble (mean probabilities; they must share a holdout)")
  parser.add_argument('--tta', type=int, default=1, help='test-time augmentation views, as '
                      'launch.py --tta')
  parser.add_argument('--data', default=None, help="the MNIST IDX folder (default: each "
                      "workdir's config.data.manual_dir)")
  parser.add_argument('--json', default=None, help='write the figures here')
  parser.add_argument('--picture', default=None, help='draw the first images of the split '
                      'under each stress into this PNG')
  return parser.parse_args(argv)


def trained_config(workdir: str, data_dir: str | None):
  """The config `workdir` was trained with, reading its data from `data_dir` if given."""
  from digitjax import stored_config
  config = stored_config.load(workdir)
  if data_dir:
    config.data.manual_dir = os.path.abspath(data_dir)
  return config


def measure(args) -> list[dict]:
  """run_stress of each workdir, with the config it was trained with; --combine: of all their
  members as one ensemble."""
  from digitjax import modes
  request = modes.Request('eval', args.checkpoint, args.split, member=args.member, tta=args.tta)
  pairs = [(trained_config(workdir, args.data), workdir) for workdir in args.workdir]
  if args.combine:
    (config, workdir), *also = pairs
    return [modes.run_stress(config, workdir, args.stress, request, tuple(also))]
  return [modes.run_stress(config, workdir, args.stress, request) for config, workdir in pairs]


def table(found: list[dict]) -> str:
  """One row per stress (clean first), then the mean over the stresses and the score that
  weighs both halves alike (docs/results.md "Session 7"), one column per workdir: accuracy on
  the split they were measured on."""
  from digitjax import modes
  stresses, split = found[0]['stresses'], found[0]['split']
  accuracy = f'{modes.SPLITS[split]}_accuracy'
  lines = ['| stress | what | ' + ' | '.join(f'`{r["workdir"]}`' for r in found) + ' |',
           '| --- | --- |' + ' --- |' * len(found)]
  for name in [modes.CLEAN] + list(stresses):
    what = stresses.get(name, f'the {split} split as it is')
    lines.append(f'| {name} | {what} | ' + ' | '.join(
        f'{r[accuracy][name]:.4f}' for r in found) + ' |')
  if stresses:
    mean = lambda r: sum(r[accuracy][n] for n in stresses) / len(stresses)
    lines.append(f'| mean of the {len(stresses)} stresses | | ' + ' | '.join(
        f'**{mean(r):.4f}**' for r in found) + ' |')
    lines.append('| score | (clean + the mean of the stresses) / 2 | ' + ' | '.join(
        f'{(r[accuracy][modes.CLEAN] + mean(r)) / 2:.4f}' for r in found) + ' |')
  return '\n'.join(lines)


def draw(path: str, images, count: int = 8) -> None:
  """The first `count` images, as they are and under each stress, one row each."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  from digitjax import augment
  rows = [('clean', images[:count])] + [
      (name, np.asarray(augment.stressed(images[:count], name))) for name in augment.STRESSES]
  fig, axes = plt.subplots(len(rows), count, figsize=(count * 0.9, len(rows) * 0.95))
  for (name, row), ax_row in zip(rows, axes):
    for image, ax in zip(row, ax_row):
      ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
    ax_row[0].set_ylabel(name, rotation=0, ha='right', va='center', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=72)
  plt.close(fig)
  from PIL import Image
  Image.open(path).convert('L').save(path, optimize=True)  # grey pictures: a third the bytes


def main(argv=None) -> int:
  args = parse(argv)
  from digitjax import errors, modes
  try:
    found = measure(args)
    if args.picture:
      config = trained_config(args.workdir[0], args.data)
      draw(args.picture, modes.split_arrays(config, args.split)['image'])
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  print(table(found))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(found, f, indent=1)
  return 0


if __name__ == '__main__':
  from absl import logging as absl_logging
  from digitjax import metrics
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds are chatty at INFO
  metrics.quiet_notices()
  sys.exit(main())
