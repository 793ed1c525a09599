"""The eval, predict and report modes: a trained workdir put to use without training.

Checkpoints are opened read-only. eval adds workdir/eval.json, report redraws workdir/plots/,
predict leaves the workdir as it was. Evaluation goes through `train.Evaluator` with the config's
eval_batch_size, the very program that computed results.json, so the numbers match exactly.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import sys

import jax
import numpy as np

from digitjax import checkpoint as ckpt_lib, configlib, data, ensemble, metrics as metrics_lib
from digitjax import parallel, train
from digitjax.errors import UserError
from digitjax.metrics import log

# --split value -> the Splits field and the metric prefix results.json uses for it.
SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}
# report redraws what training drew at its end: the final state, which results.json describes.
DEFAULT_CHECKPOINT = {'eval': 'best', 'predict': 'best', 'report': 'latest'}
# The config fields a checkpoint must share with the config using it. The batch size shapes only
# training; predict needs just the architecture (and the number of ensemble members); eval and
# report also the data's split.
FIT_FIELDS = {
    'predict': tuple(f for f in ckpt_lib.RESUME_FIELDS
                     if f.startswith('model.') or f == 'ensemble_size'),
    'eval': tuple(f for f in ckpt_lib.RESUME_FIELDS if f != 'batch_size'),
}
FIT_FIELDS['report'] = FIT_FIELDS['eval']


# ---------------------------------------------------------------------------------------------
# Checkpoints


def open_checkpoints(workdir: str) -> ckpt_lib.Checkpoints:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise UserError(f'no checkpoint in {workdir} ({directory} does not exist); train with '
                    f'--mode=train first, or point --workdir at a trained run')
  with _read_only_notices_hidden():
    checkpoints = ckpt_lib.Checkpoints(directory, read_only=True)
  if not checkpoints.steps():
    checkpoints.close()
    raise UserError(f'no checkpoint in {directory}; train with --mode=train first')
  return checkpoints


@contextlib.contextmanager
def _read_only_notices_hidden():
  """Orbax warns that a read-only manager is read-only; predict's stderr is for bad inputs."""
  logger = logging.getLogger('absl')
  level = logger.level
  if logger.getEffectiveLevel() >= logging.WARNING:  # not when the user asked for -v
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def select_step(checkpoints: ckpt_lib.Checkpoints, which: str) -> int:
  """The step that --checkpoint names: 'best' (by validation accuracy), 'latest' or a number."""
  steps = checkpoints.steps()
  if which == 'latest':
    return steps[-1]
  if which == 'best':
    best = checkpoints.best_step()
    # Only checkpoints saved at an epoch's end carry a validation accuracy; a run stopped in its
    # first epoch has none, and its latest checkpoint is all there is.
    return steps[-1] if best is None else best
  if which.isdigit():
    if int(which) not in steps:
      raise UserError(f'--checkpoint={which}: no checkpoint at that step in '
                      f'{checkpoints.directory}; it holds steps {steps}')
    return int(which)
  raise UserError(f'--checkpoint={which!r} is unknown: use best, latest or a step number '
                  f'(this workdir holds steps {steps})')


def restore(config, workdir: str, which: str, mode: str = 'eval'):
  """(state, step, meta, mesh): the chosen checkpoint, replicated on this host's devices.

  It must fit the config in the fields `mode` depends on (FIT_FIELDS).
  """
  checkpoints = open_checkpoints(workdir)
  try:
    step = select_step(checkpoints, which)
    where = f'{checkpoints.directory}/{step}'
    try:
      meta = checkpoints.read_meta(step)
    except Exception as e:  # orbax raises many kinds for damaged files
      raise UserError(f'checkpoint {where} is unreadable ({_first_line(e)}); pick another with '
                      f'--checkpoint=STEP (steps: {checkpoints.steps()})') from e
    saved = {k: v for k, v in meta.get('resume_fields', {}).items() if k in FIT_FIELDS[mode]}
    checkpoints.check_compatible({'resume_fields': saved}, config.to_dict(), step)
    mesh = parallel.make_mesh()
    target = jax.device_put(
        ensemble.init_state(lambda key: train.create_train_state(config, key), config),
        parallel.replicated(mesh))
    try:
      state, meta = checkpoints.restore(step, target)
    except Exception as e:
      raise UserError(f'checkpoint {where} is unreadable ({_first_line(e)}); pick another with '
                      f'--checkpoint=STEP (steps: {checkpoints.steps()})') from e
  finally:
    checkpoints.close()
  return state, step, meta, mesh


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:200] if lines else ""}'


# ---------------------------------------------------------------------------------------------
# eval


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
  """{'0': accuracy on the examples labelled 0, ...}; None for a class with no examples."""
  predictions = logits.argmax(-1)
  return {str(c): float(np.mean(predictions[labels == c] == c)) if np.any(labels == c) else None
          for c in range(num_classes)}


def restore_members(config, workdir: str, checkpoint: str, mode: str = 'eval'):
  """(images -> logits, step, epoch) of the checkpoint `checkpoint` names: (N, C) logits of one
  model, (K, N, C) of an ensemble's members. With config.ensemble_variants, every member of every
  variant, each variant's own checkpoint (the steps a list, the epoch None)."""
  if config.ensemble_variants:
    from digitjax import variants
    member_logits, steps = variants.restore_members(config, workdir, checkpoint, mode)
    return member_logits, steps, None
  state, step, meta, mesh = restore(config, workdir, checkpoint, mode)
  evaluator = train.Evaluator.for_config(config, mesh)
  return (lambda images: evaluator.logits(state, images)), step, meta.get('epoch')


def run_eval(config, workdir: str, checkpoint: str = 'best', split: str = 'test') -> dict:
  """Evaluates a checkpoint on a split; prints the numbers and writes workdir/eval.json."""
  configlib.validate(config)
  if split not in SPLITS:
    raise UserError(f'--split={split!r} is unknown: use one of {", ".join(SPLITS)}')
  member_logits, step, epoch = restore_members(config, workdir, checkpoint)
  prefix = SPLITS[split]
  examples = getattr(data.load_splits(config), prefix)
  if not len(examples['label']):
    raise UserError(f'the {split} split is empty (config.validation_fraction='
                    f'{config.validation_fraction}); evaluate another --split')
  logits = member_logits(examples['image'])
  metrics = train.evaluation_metrics(logits, examples['label'])
  per_class = per_class_accuracy(ensemble.combine_logits(logits), examples['label'],
                                 config.model.num_classes)
  result = {'split': split, 'checkpoint': checkpoint, 'checkpoint_step': step,
            'epoch': epoch, f'{prefix}_accuracy': metrics['accuracy'],
            f'{prefix}_loss': metrics['loss'], f'{prefix}_examples': len(examples['label']),
            f'{prefix}_per_class_accuracy': per_class, **ensemble.member_summary(prefix, metrics)}
  log(f'Checkpoint step {step} ({checkpoint}): {prefix}_accuracy {metrics["accuracy"]:.4f} - '
      f'{prefix}_loss {metrics["loss"]:.4f} ({len(examples["label"])} images)'
      + ensemble.describe(prefix, result))
  log('Per-class accuracy: ' + ' | '.join(
      f'{c} {"-" if a is None else f"{a:.4f}"}' for c, a in per_class.items()))
  if parallel.is_main_process():
    path = os.path.join(workdir, 'eval.json')
    train.write_json_atomic(path, result)  # the same atomic write that results.json gets
    log(f'Wrote {path}')
  return result


# ---------------------------------------------------------------------------------------------
# predict


def _csv_text(names: list[str], probabilities: np.ndarray) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')  # quotes any path holding a comma
  writer.writerow(['path', 'prediction', 'confidence'])
  for name, p in zip(names, probabilities):
    writer.writerow([name, int(p.argmax()), f'{p.max():.4f}'])
  return buffer.getvalue()


def _write_text(text: str, output: str | None) -> None:
  if not output:
    sys.stdout.write(text)
    sys.stdout.flush()
    return
  try:
    with open(output, 'w') as f:
      f.write(text)
  except OSError as e:
    raise UserError(f'--output={output}: cannot write ({e.strerror})') from e


def run_predict(config, workdir: str, inputs: list[str], output: str | None = None,
                checkpoint: str = 'best') -> int:
  """Classifies image files, folders of them and arrays; returns the exit status.

  The CSV goes to stdout or `output`; each unreadable input is one `PATH: error: reason` line on
  stderr and makes the status 1, while the other inputs are still classified.
  """
  from digitjax import images  # Pillow is needed only here
  configlib.validate(config)
  if not inputs:
    raise UserError('--mode=predict needs --inputs=PATH[,PATH...] (image files, folders, '
                    '.npy/.npz arrays)')
  member_logits, _, _ = restore_members(config, workdir, checkpoint, 'predict')
  read = images.read_inputs(inputs)
  probabilities = np.zeros((0, config.model.num_classes))
  if len(read.images):
    # An ensemble's confidence is its mean softmax probability: combine_logits is its log.
    logits = ensemble.combine_logits(member_logits(read.images[..., None]))
    probabilities = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
  if parallel.is_main_process():  # every process computes, one speaks
    for path, reason in read.errors:
      print(f'{path}: error: {reason}', file=sys.stderr, flush=True)
    _write_text(_csv_text(read.names, probabilities), output)
  return 1 if read.errors else 0


# ---------------------------------------------------------------------------------------------
# report


def run_report(config, workdir: str, checkpoint: str = 'latest') -> list[str]:
  """Redraws workdir/plots from a checkpoint and metrics.jsonl, without training."""
  configlib.validate(config)
  state, step, _, mesh = restore(config, workdir, checkpoint, 'report')
  splits = data.load_splits(config)
  test_logits = ensemble.combine_logits(train.Evaluator.for_config(
      config, mesh).logits(state, splits.test['image']))
  if not parallel.is_main_process():  # all processes evaluate; process 0 draws, as in training
    return []
  from digitjax import report  # matplotlib is imported only when pictures are drawn
  paths = report.draw_all(workdir, splits, test_logits, metrics_lib.read_history(workdir))
  log(f'Drew {len(paths)} pictures of checkpoint step {step} ({checkpoint}) into '
      f'{os.path.join(workdir, "plots")}: {", ".join(os.path.basename(p) for p in paths)}')
  return paths


def run(mode: str, config, workdir: str, checkpoint: str | None = None, split: str = 'test',
        inputs: list[str] | None = None, output: str | None = None) -> int:
  """Runs one of the modes other than train; returns the process's exit status."""
  checkpoint = checkpoint or DEFAULT_CHECKPOINT[mode]
  if config.ensemble_variants and mode == 'report':
    from digitjax import variants
    raise UserError(f'--mode={mode} takes one variant of config.ensemble_variants at a time: '
                    f'--workdir={variants.variant_dir(workdir, 0)} (and so on) with that '
                    f'variant\'s overrides and --config.ensemble_variants="()"; eval and '
                    f'predict take them all')
  if mode == 'eval':
    run_eval(config, workdir, checkpoint, split)
    return 0
  if mode == 'predict':
    return run_predict(config, workdir, inputs, output, checkpoint)
  if mode == 'report':
    run_report(config, workdir, checkpoint)
    return 0
  raise UserError(f'--mode={mode!r} is unknown: use train, eval, predict or report')
