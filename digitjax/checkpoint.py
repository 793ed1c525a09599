"""Checkpoints with orbax: one CheckpointManager under workdir/checkpoints.

Each checkpoint holds the train state (step, params, optimizer state) and a small JSON record
(epoch, seconds trained, the config fields a resumed run must share, and a SHA-256 of the state's
arrays). The latest `keep` are kept, plus the best by validation accuracy (orbax writes the
metric beside each checkpoint, so "best" survives restarts).

Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` when
complete, so a crash mid-save leaves only a tmp directory, which is never restored (it is removed
when the next run opens the directory). Restoring tries the newest checkpoint first; one that is
truncated, unreadable or whose arrays do not hash to the recorded digest is reported, moved to
workdir/damaged_checkpoints/ and the next older one is tried. With none readable it is an error:
a run never starts over silently on top of existing checkpoints.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import glob
import hashlib
import json
import logging
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from digitjax import configlib
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError

TMP_SUFFIX = '.orbax-checkpoint-tmp'


class CheckpointMismatch(UserError):
  """The checkpoint is intact but belongs to another config."""


class CheckpointWriteError(UserError):
  pass


class DamagedCheckpoint(Exception):
  pass


def resume_fields(config_dict: dict) -> dict[str, Any]:
  """The config fields a checkpoint records, so that a config that does not fit it is named."""
  fields = {}
  for f in configlib.RESUME_FIELDS:
    value = configlib.get(config_dict, f, None)
    fields[f] = list(value) if isinstance(value, (tuple, list)) else value
  return fields


def _dotted(path) -> str:
  """A tree path as orbax names the array: opt_state.0.trace.conv1.bias."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '.'.join(parts)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """Array name -> shape, for arrays and orbax's array metadata alike."""
  return {_dotted(p): tuple(getattr(x, 'shape', ()))  # a Python int step has shape ()
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def has_ema(saved: dict[str, tuple[int, ...]]) -> bool:
  """Whether a state saved with these shapes (Checkpoints.saved_shapes) keeps an EMA of its
  weights (config.ema_decay > 0)."""
  return any(name.startswith('ema.') for name in saved)


def state_digest(state) -> str:
  """SHA-256 over every array of `state`: its name, shape and values.

  Values are hashed as float64, exact for float32 and int32, so a restore into another integer
  type (a Python int step, say) still matches.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state)):
    leaf = np.ascontiguousarray(leaf, np.float64)
    digest.update(f'{_dotted(path)}:{leaf.shape};'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _reason(e: BaseException) -> str:
  """One short line for an exception; storage errors by their OS name (TensorStore's are long)."""
  text = str(e)
  for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG, errno.EIO):
    if os.strerror(code) in text:
      return os.strerror(code)
  first = text.splitlines()[0].split(' See full TensorStore details')[0] if text else ''
  return f'{type(e).__name__}: {first[:200]}'


@contextlib.contextmanager
def _quiet_failed_reads():
  """A failed orbax restore leaves its other reads as coroutines whose errors Python prints
  later as 'Exception ignored in ...' with whole TensorStore specs; the failure itself is
  reported once, by us."""
  previous = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    if code is None or 'orbax' not in code.co_filename:
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()  # the leftover coroutines die here, while the hook is still ours
    sys.unraisablehook = previous


def _codes(tb):
  """The code objects of a traceback's frames, outermost first."""
  while tb is not None:
    yield tb.tb_frame.f_code
    tb = tb.tb_next


def _from_a_save(e: BaseException) -> bool:
  """Raised in orbax's code, or about one of its unfinished checkpoint directories (TensorStore's
  futures carry no Python traceback)."""
  return TMP_SUFFIX in str(e) or any(f'{os.sep}orbax{os.sep}' in code.co_filename
                                     for code in _codes(e.__traceback__))


class _OneLineOrbaxErrors(logging.Filter):
  """Orbax logs a failed background save with its whole traceback (TensorStore's messages are
  long) from its own thread; the failure reaches the user once, as our one-line error.

  When one of a save's parallel writes fails, the others' copies of that failure are never
  retrieved, and asyncio logs each (with its traceback) whenever their tasks or futures are
  collected, possibly after the error was printed: those are dropped, the failure has been
  raised once.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if not record.exc_info:
      return True
    if record.name == 'asyncio' and _from_a_save(record.exc_info[1]):
      return False
    if f'{os.sep}orbax{os.sep}' in record.pathname:
      first_line = (record.getMessage().splitlines() or [''])[0]
      record.msg = f'{first_line}: {_reason(record.exc_info[1])}'
      record.args, record.exc_info, record.exc_text = (), None, None
    return True


_ONE_LINE_ORBAX_ERRORS = _OneLineOrbaxErrors()


def _late_callback_after_failed_save(exc_type, exc, tb) -> bool:
  """After a failed save, orbax closes its event loop while TensorStore still finishes the other
  writes; their completion callbacks, run on TensorStore's threads, find the loop closed, and
  that error goes to sys.unraisablehook, possibly after the error line. Nothing is lost."""
  return (exc_type is RuntimeError and str(exc) == 'Event loop is closed'
          and any(code.co_name == 'call_soon_threadsafe' for code in _codes(tb)))


def _install_unraisablehook() -> None:
  previous = sys.unraisablehook
  if getattr(previous, 'digitjax', False):
    return

  def hook(unraisable):
    if not _late_callback_after_failed_save(unraisable.exc_type, unraisable.exc_value,
                                            unraisable.exc_traceback):
      previous(unraisable)

  hook.digitjax = True
  sys.unraisablehook = hook


def _process_options(process: int | None, directory: str) -> dict:
  if process is None or jax.process_count() == 1:
    return {}
  return {'multiprocessing_options': ocp.options.MultiprocessingOptions(
      primary_host=process, active_processes={process},
      barrier_sync_key_prefix=hashlib.sha256(directory.encode()).hexdigest()[:16])}


# ---------------------------------------------------------------------------------------------
# Opening: the directory made ready and the orbax manager


def _report_unfinished(directory: str) -> None:
  unfinished = sorted(glob.glob(os.path.join(glob.escape(directory), f'*{TMP_SUFFIX}*')))
  if unfinished:
    logging.warning('Ignoring %d unfinished checkpoint save(s) of an interrupted run, which '
                    'are removed: %s', len(unfinished),
                    ', '.join(os.path.basename(p) for p in unfinished))


def _set_aside_unreadable_metrics(directory: str) -> None:
  """Orbax reads every checkpoint's metric file on opening and fails on a rotten one. Such a
  file is renamed; its checkpoint stays, restorable, though no longer a candidate for best."""
  for path in glob.glob(os.path.join(glob.escape(directory), '*', 'metrics', 'metrics')):
    try:
      with open(path) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      logging.warning('Unreadable metrics file %s (%s); renamed to %s.damaged', path,
                      _reason(e), os.path.basename(path))
      os.replace(path, path + '.damaged')


def _open_manager(directory: str, keep: int, read_only: bool,
                  process: int | None) -> tuple[ocp.CheckpointManager, bool]:
  """(the orbax manager, whether arrays are saved from the host): the latest `keep` kept, and
  the best by validation accuracy."""
  # Mid-epoch checkpoints carry no metrics: they rank below every evaluated one.
  val_accuracy = lambda m: m.get('val_accuracy', -1.0)
  policy = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=val_accuracy, n=1, keep_checkpoints_without_metrics=False),
  ])
  by_one = _process_options(process, directory)
  # Orbax writes only global arrays in a multi-process run: a member that one process trains
  # alone, on its own devices, is saved as host arrays and put back on the devices restored.
  if by_one and not read_only:  # orbax leaves creating it to a manager of one process
    os.makedirs(directory, exist_ok=True)
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=val_accuracy, best_mode='max',
      create=not read_only and not by_one, read_only=read_only,
      cleanup_tmp_directories=not read_only, **by_one)
  try:
    manager = ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta'))
  except Exception as e:
    raise UserError(f'cannot open checkpoints in {directory}: {_reason(e)}') from e
  return manager, bool(by_one)


# ---------------------------------------------------------------------------------------------
# The checkpoints of one run: saved in the background, restored one step at a time


class Checkpoints:
  """Thin wrapper over ocp.CheckpointManager for this package's state and metadata."""

  def __init__(self, directory: str, keep: int = 3, read_only: bool = False,
               process: int | None = None):
    """`process`: the one process that writes these checkpoints, for a population member
    trained by one process of several (arrays on its own devices); None: all processes take
    part, as a data-parallel run's do."""
    self.directory, self.read_only = os.path.abspath(directory), read_only
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise UserError(f'{self.directory} is not a directory, so checkpoints cannot be written '
                      f'there; move it away or use another --workdir')
    for name in ('absl', '', 'asyncio'):  # orbax logs through absl (or the root logger)
      logging.getLogger(name).addFilter(_ONE_LINE_ORBAX_ERRORS)
    _install_unraisablehook()
    if not read_only:
      _report_unfinished(self.directory)
      _set_aside_unreadable_metrics(self.directory)
    self.manager, self.host_arrays = _open_manager(self.directory, keep, read_only, process)
    self._pending = None  # step of a save that may still be running in the background

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _steps_on_disk(self) -> list[int]:
    """Complete checkpoints in the directory (the manager also lists a save that failed)."""
    names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
    return sorted(int(n) for n in names if n.isdigit())

  def best_step(self) -> int | None:
    scored = [(m['val_accuracy'], s) for s in self.steps()
              if (m := self.manager.metrics(s)) and 'val_accuracy' in m]
    return max(scored)[1] if scored else None

  # Saving

  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
    """Starts saving `state` at `step` in the background; errors surface here or in `wait`."""
    meta = {**meta, 'arrays_sha256': state_digest(state)}
    if self.host_arrays:
      state = jax.device_get(state)
    metrics = {k: v for k, v in (metrics or {}).items() if np.isfinite(v)}  # NaN: nothing measured
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)),
                        metrics=metrics, force=True)
    except Exception as e:
      raise self._write_error(self._pending or step, e) from e
    self._pending = step

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(self._pending, e) from e
    self._pending = None

  def _write_error(self, step, e: Exception) -> CheckpointWriteError:
    kept = [s for s in self._steps_on_disk() if s != step]
    reason = _reason(e)
    fix = {os.strerror(errno.ENOSPC): 'free space', os.strerror(errno.EDQUOT): 'free space',
           os.strerror(errno.EFBIG): 'free space',
           os.strerror(errno.EROFS): 'make the workdir writable',
           os.strerror(errno.EACCES): 'fix the workdir\'s permissions'}.get(reason,
                                                                            'fix the cause')
    return CheckpointWriteError(
        f'could not write checkpoint {step} in {self.directory}: {reason}; the checkpoints '
        f'saved before ({kept or "none"}) are intact; {fix}, then run the same command to '
        f'resume')

  def close(self) -> None:
    self.manager.close()

  def abandon(self) -> None:
    """On the way out after an error: lets a save in flight finish (or fail) and closes,
    raising nothing, so that nothing orbax's threads print comes after the error itself."""
    for finish in (self.manager.wait_until_finished, self.manager.close):
      try:
        finish()
      except Exception:  # already reported, or about to be, by the error that brought us here
        pass

  # Restoring one step

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, target):
    """Restores `step` into the structure, shapes and shardings of `target`, checking its digest."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    if self.host_arrays:
      abstract = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), abstract)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state, meta = restored['state'], restored['meta']
    if self.host_arrays:
      state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, target))
    if meta.get('arrays_sha256') not in (None, state_digest(state)):
      raise DamagedCheckpoint('its arrays differ from the ones saved (SHA-256 mismatch)')
    return state, meta

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """Array name -> shape of the state saved at `step` (from orbax's metadata: no array read)."""
    return _shapes(ocp.StandardCheckpointHandler().metadata(
        self.manager.directory / str(step) / 'state'))

  def check_shapes(self, step: int, target, saved: dict | None = None) -> None:
    """The saved arrays against `target`'s, by name: a model that changed is named, not traced.
    `saved`: saved_shapes(step), when the caller has read them already."""
    saved = self.saved_shapes(step) if saved is None else saved
    wanted = _shapes(target)
    params_first = lambda name: (not name.startswith('params.'), name)
    for name in sorted(saved.keys() | wanted.keys(), key=params_first):
      if saved.get(name) != wanted.get(name):
        state = lambda d: f'of shape {d[name]}' if name in d else 'absent'
        ema = (f' (config.ema_decay: the checkpoint was trained '
               f'{"with" if name in saved else "without"} weight averaging)'
               if name.startswith('ema.') else '')
        raise CheckpointMismatch(
            f'checkpoint {self.directory}/{step} does not fit the config: array {name} is '
            f'{state(saved)} in the checkpoint but {state(wanted)} in the model{ema}; use the '
            f'checkpoint\'s settings or a new --workdir')

  def discard_after(self, step: int) -> None:
    """Removes the checkpoints after `step`: the run resumes from `step` (the one its
    population's members share) and will write them again, bit for bit the same."""
    later = [s for s in self.steps() if s > step]
    if not later or self.read_only:
      return
    logging.warning('Removing checkpoint(s) %s of %s: the run resumes from step %d, which every '
                    'member has, and will write them again', later, self.directory, step)
    for s in later:
      self.manager.delete(s)
    self.manager.reload()

  def set_aside(self, steps: list[int]) -> None:
    """Moves damaged checkpoints out of the way of the steps the resumed run will save."""
    if not steps or self.read_only:
      return
    aside = os.path.join(os.path.dirname(self.directory), workdir_lib.DAMAGED_CHECKPOINTS)
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      dest, n = os.path.join(aside, str(step)), 1
      while os.path.exists(dest):
        dest, n = os.path.join(aside, f'{step}.{n}'), n + 1
      os.rename(os.path.join(self.directory, str(step)), dest)
      logging.warning('Moved damaged checkpoint %d to %s', step, dest)
    self.manager.reload()


# ---------------------------------------------------------------------------------------------
# Resuming: the newest checkpoint that fits the config, past damaged ones


def restore_newest(checkpoints: Checkpoints, target, fields: dict,
                   steps: list[int] | None = None):
  """(state, meta, step) from the newest readable checkpoint, or (None, None, None) if none.

  A damaged checkpoint is reported, skipped, and once an older one is restored moved aside;
  a checkpoint of another config (`fields`: its resume_fields) is an error.
  """
  steps = sorted(checkpoints.steps() if steps is None else steps, reverse=True)
  damaged = []
  with _quiet_failed_reads():
    for step in steps:
      try:
        meta = checkpoints.read_meta(step)
        check_fits(meta, fields, f'{checkpoints.directory}/{step}')
        checkpoints.check_shapes(step, target)
        state, meta = checkpoints.restore(step, target)
      except CheckpointMismatch:
        raise
      except Exception as e:  # damaged: try an older checkpoint
        damaged.append((step, _reason(e)))
        logging.warning('Checkpoint %s/%d is damaged (%s); trying an older one',
                        checkpoints.directory, step, damaged[-1][1])
        continue
      checkpoints.set_aside([s for s, _ in damaged])
      return state, meta, step
  if damaged:
    errors = '; '.join(f'step {s}: {r}' for s, r in damaged)
    raise UserError(f'no readable checkpoint in {checkpoints.directory} ({errors}); move the '
                    f'damaged checkpoints away to start over, or use another --workdir')
  return None, None, None


def check_newest_fits(checkpoints: Checkpoints, fields: dict) -> None:
  """A CheckpointMismatch if the newest readable record belongs to another config (`fields`:
  its resume_fields)."""
  for step in sorted(checkpoints.steps(), reverse=True):
    try:
      meta = checkpoints.read_meta(step)
    except Exception:  # damaged: restore_newest reports it
      continue
    check_fits(meta, fields, f'{checkpoints.directory}/{step}')
    return


# ---------------------------------------------------------------------------------------------
# Fit: a checkpoint's record and arrays against a config


def check_compatible(meta: dict, config_dict: dict, where: str) -> None:
  """A CheckpointMismatch naming the fields where checkpoint `where`'s record and the config
  differ."""
  check_fits(meta, resume_fields(config_dict), where)


def check_fits(meta: dict, current: dict, where: str) -> None:
  """check_compatible with the config's resume_fields (`current`) given."""
  saved = meta.get('resume_fields', {})
  if (saved.get('ensemble_size') or 1) > 1:
    raise CheckpointMismatch(
        f'checkpoint {where} holds a seed ensemble of '
        f'{saved["ensemble_size"]} models stacked in one state, written by an earlier '
        f'digitjax; ensembles are populations now, one folder per member: train it again in '
        f'a new --workdir with --config.sweep.grid=\'seed=...\' --config.sweep.select=ensemble')
  diffs = [f'{k}={saved[k]!r} in the checkpoint but {current[k]!r} in the config'
           for k in configlib.RESUME_FIELDS if k in saved and saved[k] != current[k]]
  if diffs:
    raise CheckpointMismatch(f'checkpoint {where} does not fit the config: '
                             f'{"; ".join(diffs)}; use the checkpoint\'s settings or a new '
                             f'--workdir')
