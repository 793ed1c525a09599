"""Inference: logits of a split, metrics from logits, members combined, checkpoints restored for
use. Training evaluates with the very `Evaluator` the modes use, so eval reproduces results.json.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from digitjax import checkpoint as ckpt_lib, configlib, model as model_lib, parallel, steps
from digitjax import augment, workdir as workdir_lib
from digitjax.errors import UserError


# ---------------------------------------------------------------------------------------------
# Metrics from logits


def log_softmax64(logits: np.ndarray) -> np.ndarray:
  """Log-probabilities along the last axis, in float64 on the host."""
  logp = np.asarray(logits, np.float64)
  logp = logp - logp.max(-1, keepdims=True)
  return logp - np.log(np.exp(logp).sum(-1, keepdims=True))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  if not len(labels):  # an empty split (validation_fraction=0): nothing to measure
    return {'loss': float('nan'), 'accuracy': float('nan')}
  logp = log_softmax64(logits)
  return {'loss': float(-logp[np.arange(len(labels)), labels].mean()),
          'accuracy': float((logits.argmax(-1) == labels).mean())}


def combine_logits(member_logits) -> np.ndarray:
  """Members' logits, (K, N, C) or a list of K (N, C) -> (N, C) log of the mean softmax
  probability. The log keeps the result usable wherever logits are: softmax gives the mean
  probabilities back and argmax the ensemble's prediction. One member's logits pass unchanged.
  """
  if isinstance(member_logits, np.ndarray) and member_logits.ndim == 2:
    return member_logits
  if len(member_logits) == 1:
    return np.asarray(member_logits[0])
  stacked = np.stack([np.asarray(m) for m in member_logits])
  if stacked.size == 0:  # an empty split: nothing to average
    return stacked[0]
  log_probs = log_softmax64(stacked)
  top = log_probs.max(0)  # log(mean(exp)) taken about the largest, so nothing underflows
  return top + np.log(np.exp(log_probs - top).mean(0))


def member_summary(split: str, member_metrics: list[dict]) -> dict:
  """member_<split>_accuracy and _loss (one entry per member) and the accuracy's mean and
  sample standard deviation over members; {} for a single model."""
  if len(member_metrics) < 2:
    return {}
  accuracy = [m['accuracy'] for m in member_metrics]
  return {f'member_{split}_accuracy': accuracy,
          f'member_{split}_accuracy_mean': float(np.mean(accuracy)),
          f'member_{split}_accuracy_std': float(np.std(accuracy, ddof=1)),
          f'member_{split}_loss': [m['loss'] for m in member_metrics]}


def describe(split: str, summary: dict) -> str:
  """' - member_val_accuracy: 0.9812 0.9790 (mean 0.9801, std 0.0016)'; '' for one model."""
  accuracy = summary.get(f'member_{split}_accuracy')
  if accuracy is None:
    return ''
  return (f' - member_{split}_accuracy: {" ".join(f"{a:.4f}" for a in accuracy)} '
          f'(mean {summary[f"member_{split}_accuracy_mean"]:.4f}, '
          f'std {summary[f"member_{split}_accuracy_std"]:.4f})')


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
  """{'0': accuracy on the examples labelled 0, ...}; None for a class with no examples."""
  predictions = logits.argmax(-1)
  return {str(c): float(np.mean(predictions[labels == c] == c)) if np.any(labels == c) else None
          for c in range(num_classes)}


def probabilities(logits: np.ndarray) -> np.ndarray:
  return np.exp(log_softmax64(logits)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Evaluation


class Evaluator:
  """Logits of a whole split in fixed-size padded batches: one compiled program per batch size.

  The batch is config.eval_batch_size rounded up to a multiple of the devices (batches are
  padded anyway: 1000 on 16 TPU chips is 1008), or the split's size, rounded up likewise, when
  that is smaller: a huge eval_batch_size never pads a small split to it.
  """

  def __init__(self, mesh, batch_size: int, model: model_lib.CNN):
    devices = parallel.data_size(mesh)
    self.mesh, self.batch_size = mesh, -(-batch_size // devices) * devices
    self._sharding = parallel.batch_sharding(mesh)
    self._step = jax.jit(functools.partial(steps.eval_step, model=model),
                         out_shardings=parallel.replicated(mesh))
    # Every view but the identity in one program: the view's numbers are its arguments.
    self._view_step = jax.jit(functools.partial(_view_eval_step, model=model),
                              out_shardings=parallel.replicated(mesh))
    self._views = {}  # view index -> its (angle, dy, dx) on the devices

  @classmethod
  def for_config(cls, config, mesh, choices: configlib.Choices | None = None) -> 'Evaluator':
    """The evaluator of a run: its eval batch, and the model's inference formulation."""
    choices = choices or configlib.resolve(config, data_devices=parallel.data_size(mesh))
    model = model_lib.build_model(config.model, choices.eval_conv_impl, choices.eval_pool_impl)
    return cls(mesh, config.eval_batch_size, model)

  def logits(self, state, images: np.ndarray, view: int = 0) -> np.ndarray:
    """Logits of `images` seen as augment.TTA_VIEWS[view] (0: as they are)."""
    step = self._step if view == 0 else functools.partial(self._view_step, view=self._view(view))
    n, devices = len(images), parallel.data_size(self.mesh)
    b = min(self.batch_size, -(-max(n, 1) // devices) * devices)
    index, count = parallel.share(self.mesh)
    per_process = b // count
    outputs = []
    for start in range(0, n, b):
      chunk = images[start:start + b]
      if len(chunk) < b:
        chunk = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], chunk.dtype)])
      mine = chunk[index * per_process:(index + 1) * per_process]
      outputs.append(step(state, parallel.to_global({'image': mine}, self._sharding)))
    if not outputs:
      return np.zeros((0, 0), np.float32)
    return np.concatenate(jax.device_get(outputs), axis=0)[:n]

  def evaluate(self, state, split: dict[str, np.ndarray]) -> dict:
    return classification_metrics(self.logits(state, split['image']), split['label'])

  def tta_logits(self, state, images: np.ndarray, views: int) -> np.ndarray:
    """Test-time augmentation: the log of the mean softmax probability of the first `views`
    views of augment.TTA_VIEWS (combine_logits of each view's logits); with 1 view, logits()
    exactly."""
    return combine_logits([self.logits(state, images, v) for v in range(views)])

  def _view(self, view: int):
    """augment.TTA_VIEWS[view] as a float32 array on the devices: the view program's input."""
    if view not in self._views:
      self._views[view] = jax.device_put(np.asarray(augment.TTA_VIEWS[view], np.float32),
                                         parallel.replicated(self.mesh))
    return self._views[view]


def _view_eval_step(state, batch, view, model):
  """eval_step of the batch's images moved by `view` ((angle, dy, dx), an array: one program
  for every view) on device (as pixel values: eval_step scales them to [0, 1])."""
  return steps.eval_step(state, {'image': augment.view(batch['image'].astype(jnp.float32), view)},
                         model)


def check_tta(views) -> None:
  """--tta=N: N views, 1 (none) to len(augment.TTA_VIEWS)."""
  most = len(augment.TTA_VIEWS)
  if not (isinstance(views, int) and 1 <= views <= most):
    raise UserError(f'--tta={views} is invalid: give 1 (no test-time augmentation) to {most} '
                    f'views ({", ".join(augment.describe_view(v) for v in augment.TTA_VIEWS)}, '
                    f'used in this order)')


def tta_views(views: int) -> list[str]:
  """The first `views` views, described ('identity', 'shifted right 1 px', ...)."""
  return [augment.describe_view(v) for v in augment.TTA_VIEWS[:views]]


# ---------------------------------------------------------------------------------------------
# Checkpoints restored for use


def abstract_state(config, mesh, ema: bool | None = None):
  """The train state's tree, shapes and dtypes for `config`, replicated on `mesh` (no arrays:
  a restore target); `ema`: with or without an EMA of the weights (None: as config.ema_decay
  says)."""
  model = model_lib.build_model(config.model)
  spec = steps.spec(config, model, steps_per_epoch=1)
  if ema is not None:
    spec = dataclasses.replace(spec, ema=ema)
  shapes = jax.eval_shape(functools.partial(steps.init_state, spec,
                                            steps.hyper(config, steps_per_epoch=1)),
                          jax.random.key(0))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes)


def stored_config(workdir: str) -> dict | None:
  """The config a workdir was trained with, as a dict (stored_config_source's); None if it
  holds none, or only a damaged one."""
  found = stored_config_source(workdir)
  return found[0] if found and isinstance(found[0], dict) else None


def stored_config_source(workdir: str) -> tuple[object, str] | None:
  """(record, where): the 'config' a workdir was trained with, and the file it came from: a
  population's config.json, else a run's results.json, else the metadata of its newest readable
  checkpoint; None if it holds none. The record is as stored: a damaged file's may be anything
  (stored_config.py names the file and the field)."""
  files = workdir_lib.RunFiles.of(workdir)
  for path in (files.config, files.results):
    record = workdir_lib.read_json(path, 'record')
    if record and 'config' in record:
      return record['config'], path
  if not os.path.isdir(files.checkpoints):
    return None
  with _read_only_notices_hidden():
    checkpoints = ckpt_lib.Checkpoints(files.checkpoints, read_only=True)
  try:
    for step in reversed(checkpoints.steps()):
      try:
        meta = checkpoints.read_meta(step)
      except Exception:  # damaged: an older one may do
        continue
      if isinstance(meta, dict) and 'config' in meta:
        return meta['config'], f'{checkpoints.directory}/{step} (checkpoint metadata)'
  finally:
    checkpoints.close()
  return None


def open_checkpoints(files: workdir_lib.RunFiles) -> ckpt_lib.Checkpoints:
  directory = files.checkpoints
  if not os.path.isdir(directory):
    raise _diverged_without_checkpoint(files) or UserError(
        f'no checkpoint in {files.dir} ({directory} does not exist); train with --mode=train '
        f'first, or point --workdir at a trained run')
  with _read_only_notices_hidden():
    checkpoints = ckpt_lib.Checkpoints(directory, read_only=True)
  if not checkpoints.steps():
    checkpoints.close()
    raise _diverged_without_checkpoint(files) or UserError(
        f'no checkpoint in {directory}; train with --mode=train first')
  return checkpoints


def _diverged_without_checkpoint(files: workdir_lib.RunFiles) -> UserError | None:
  """Why a run that diverged before its first checkpoint has none (its results.json says
  diverged_at_step): training it again the same way would diverge again."""
  results = workdir_lib.read_json(files.results, 'results file') or {}
  at = results.get('diverged_at_step')
  if at is None:
    return None
  member = os.path.basename(os.path.dirname(files.dir)) == workdir_lib.MEMBERS
  what = f'member {os.path.basename(files.dir)}' if member else f'the run in {files.dir}'
  fix = ('pick another member with --member=INDEX' if member else
         'train it again with a lower config.learning_rate')
  return UserError(f'{what} diverged at step {at} (the training loss became non-finite) before '
                   f'any checkpoint, so it has none to use; {fix}')


class _read_only_notices_hidden:
  """Orbax warns that a read-only manager is read-only; predict's stderr is for bad inputs."""

  def __enter__(self):
    self.logger = logging.getLogger('absl')
    self.level = self.logger.level
    if self.logger.getEffectiveLevel() >= logging.WARNING:  # not when the user asked for -v
      self.logger.setLevel(logging.ERROR)

  def __exit__(self, *exc):
    self.logger.setLevel(self.level)


def select_step(checkpoints: ckpt_lib.Checkpoints, which: str) -> int:
  """The step that --checkpoint names: 'best' (by validation accuracy), 'latest' or a number."""
  steps_ = checkpoints.steps()
  if which == 'latest':
    return steps_[-1]
  if which == 'best':
    best = checkpoints.best_step()
    # Only checkpoints saved at an epoch's end carry a validation accuracy; a run stopped in its
    # first epoch has none, and its latest checkpoint is all there is.
    return steps_[-1] if best is None else best
  if which.isdigit():
    if int(which) not in steps_:
      raise UserError(f'--checkpoint={which}: no checkpoint at that step in '
                      f'{checkpoints.directory}; it holds steps {steps_}')
    return int(which)
  raise UserError(f'--checkpoint={which!r} is unknown: use best, latest or a step number '
                  f'(this workdir holds steps {steps_})')


def restore(config, files: workdir_lib.RunFiles, which: str, mode: str, mesh):
  """(state, step, meta): the checkpoint `which` names, replicated on `mesh`.

  It must fit the config in the fields `mode` depends on (configlib.FIT_FIELDS). Its EMA of the
  weights, if it kept one, comes with it whatever config.ema_decay says (steps.averaged gives
  the model it delivers).
  """
  checkpoints = open_checkpoints(files)
  try:
    step = select_step(checkpoints, which)
    where = f'{checkpoints.directory}/{step}'
    try:
      meta = checkpoints.read_meta(step)
    except Exception as e:  # orbax raises many kinds for damaged files
      raise UserError(f'checkpoint {where} is unreadable ({first_line(e)}); pick another with '
                      f'--checkpoint=STEP (steps: {checkpoints.steps()})') from e
    saved = meta.get('resume_fields', {}) if isinstance(meta, dict) else {}
    fit = {k: v for k, v in saved.items()
           if k in configlib.FIT_FIELDS[mode] or k == 'ensemble_size'}
    ckpt_lib.check_compatible({'resume_fields': fit}, config.to_dict(), where)
    saved = checkpoints.saved_shapes(step)  # orbax's metadata, read once for both
    target = abstract_state(config, mesh, ema=ckpt_lib.has_ema(saved))
    checkpoints.check_shapes(step, target, saved)
    try:
      state, meta = checkpoints.restore(step, target)
    except Exception as e:
      raise UserError(f'checkpoint {where} is unreadable ({first_line(e)}); pick another with '
                      f'--checkpoint=STEP (steps: {checkpoints.steps()})') from e
  finally:
    checkpoints.close()
  return state, step, meta


def first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:200] if lines else ""}'
