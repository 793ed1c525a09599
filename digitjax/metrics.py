"""Where metrics go: the console (Keras-like lines, a progress bar on a terminal), JSON lines
and TensorBoard event files of a run. Only process 0 writes (or, for a population member that
one process trains alone, that process)."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time

from digitjax import parallel
from digitjax import signals
from digitjax import workdir as workdir_lib


# Other libraries' notices with nothing for a digitjax user to act on: tfds on a prepared
# dataset's folder before its first preparation, and on decoding PNGs without OpenCV.
_NOTICES = ('Variant folder ', 'OpenCV is not installed')


class _DropNotices(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno <= logging.WARNING and
                str(record.msg).startswith(_NOTICES))


def tensorboardx():
  """The tensorboardX package, imported without PyTorch. Where torch is installed, tensorboardX
  imports it at once only to name torch.Tensor in its type hints (it converts a torch tensor
  by its type's name, importing torch then): 2 s of every run's start-up and ~180 MB that
  digitjax, which writes plain floats, never uses. A torch already imported stays as it is;
  one imported later (by the user, or by tensorboardX for a torch tensor) is the real one."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # `import torch` raises ImportError while this holds
  try:
    import tensorboardX
  finally:
    if hide and 'torch' in sys.modules and sys.modules['torch'] is None:
      del sys.modules['torch']
  return tensorboardX


def verbose() -> bool:
  """Whether the user asked for other libraries' messages (launch.py's -v 0 or more)."""
  from absl import logging as absl_logging
  return absl_logging.get_verbosity() >= absl_logging.INFO


def quiet_notices() -> None:
  """Keeps the notices above off the console (-v brings them back)."""
  if not verbose():
    logging.getLogger('absl').addFilter(_DropNotices())


@contextlib.contextmanager
def quiet_native_stderr():
  """While TensorFlow's C++ libraries load, their start-up notices (oneDNN, CUDA probing,
  absl's 'before InitializeLog') go to the process's stderr file descriptor, beyond Python's
  logging: it points at /dev/null for that moment only, unless -v was given. A Python error
  raised meanwhile is printed after it points back."""
  if verbose():
    yield
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    with signals.acknowledged_on(saved):  # a Ctrl-C meanwhile is still acknowledged
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def log(msg: str = '') -> None:
  if parallel.is_main_process():
    print(msg, flush=True)


class MetricWriter:
  """Appends {'step':..., **metrics} to a run's metrics.jsonl and to TensorBoard scalars.

  `after_step`: the step the run resumes from; records the log holds beyond it (written by a
  run that got further before it was stopped) are dropped, so none is written twice.
  """

  def __init__(self, files: workdir_lib.RunFiles, after_step: int | None = None,
               enabled: bool | None = None):
    self.enabled = parallel.is_main_process() if enabled is None else enabled
    self._tb = None
    if not self.enabled:
      return
    self._log = workdir_lib.JsonLines(files.metrics, after_step)
    try:
      self._tb = tensorboardx().SummaryWriter(files.tensorboard, flush_secs=10)
    except ImportError:  # optional: JSON lines still carry everything
      logging.warning('tensorboardX is not installed; TensorBoard files are not written')

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """A record in metrics.jsonl and its numbers in TensorBoard."""
    if not self.enabled:
      return
    self._log.append({'step': step, **metrics})
    self.scalars(step, metrics)

  def scalars(self, step: int, metrics: dict[str, float]) -> None:
    """Numbers for TensorBoard only (the training curve between epochs)."""
    if self._tb is None:
      return
    for name, value in metrics.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_history(files: workdir_lib.RunFiles) -> list[dict]:
  """The per-epoch records of a run's metrics.jsonl, the last one for each epoch."""
  by_epoch = {}
  for record in workdir_lib.read_jsonl(files.metrics):
    if isinstance(record.get('epoch'), int):
      by_epoch[record['epoch']] = record
  return [by_epoch[e] for e in sorted(by_epoch)]


class Progress:
  """A one-line progress bar on a terminal; silent otherwise (the epoch line says it all)."""

  def __init__(self, total: int, prefix: str, every_seconds: float = 0.5):
    self.total, self.prefix, self.every = total, prefix, every_seconds
    self.active = sys.stdout.isatty() and parallel.is_main_process()
    self.start = self.last = time.perf_counter()

  def due(self) -> bool:
    return self.active and time.perf_counter() - self.last >= self.every

  def show(self, done: int, loss: float | None = None) -> None:
    self.last = now = time.perf_counter()
    width = 30
    filled = int(width * done / max(self.total, 1))
    rate = (now - self.start) / max(done, 1)
    text = (f'\r{self.prefix} {done}/{self.total} [{"=" * filled}{"." * (width - filled)}] '
            f'{now - self.start:.0f}s, ETA {rate * (self.total - done):.0f}s')
    if loss is not None and math.isfinite(loss):
      text += f' - loss: {loss:.4f}'
    sys.stdout.write(text)
    sys.stdout.flush()

  def clear(self) -> None:
    if self.active:
      sys.stdout.write('\r' + ' ' * 100 + '\r')
      sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# TensorBoard's HParams dashboard

HPARAMS_SUFFIX = '.hparams'  # the event files write_hparams writes (and replaces) end so


def _hparams_writer(logdir: str):
  """A tensorboardX writer of one event file in exactly `logdir` (no timestamped subfolder),
  after removing the event files an earlier write_hparams left there."""
  os.makedirs(logdir, exist_ok=True)
  for name in os.listdir(logdir):
    if 'tfevents' in name and name.endswith(HPARAMS_SUFFIX):
      os.unlink(os.path.join(logdir, name))
  return tensorboardx().FileWriter(logdir, filename_suffix=HPARAMS_SUFFIX)


def _finite_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def write_hparams(root: str, space_fields: list[str], runs: list[dict],
                  metric_tags: list[str]) -> None:
  """Files for TensorBoard's HParams dashboard (`tensorboard --logdir ROOT`), one row per run.

  `root` gets the experiment (the hparams `space_fields` and the metrics `metric_tags`);
  each run {'name': 'slot0', 'hparams': {field: value}, 'metrics': {tag: [(step, value)]}}
  gets the folder root/<name> holding its session (its values of the fields, a missing one
  left out; the session ended) and its scalars under metric_tags (other tags, and None or
  non-finite values, left out). Every event file written here ends in HPARAMS_SUFFIX and
  replaces the one an earlier call wrote in the same folder, so calling again with more
  steps rewrites the rows instead of doubling them; other files are left alone. Names are
  used as given: one path component each (workdir.safe_name makes one).
  """
  summary = tensorboardx().summary
  names = [run['name'] for run in runs]
  bad = [n for n in names if not n or os.sep in n or n in ('.', '..')]
  if bad or len(set(names)) != len(names):
    raise ValueError(f'run names must be distinct single path components, got {names}')
  example = {f: next((r['hparams'][f] for r in runs if r['hparams'].get(f) is not None), 0.0)
             for f in space_fields}
  experiment, _, _ = summary.hparams(example, {tag: 0.0 for tag in metric_tags})
  writer = _hparams_writer(root)
  try:
    writer.add_summary(experiment)
  finally:
    writer.close()
  for run in runs:
    values = {f: run['hparams'][f] for f in space_fields if run['hparams'].get(f) is not None}
    _, start, end = summary.hparams(values, {})
    writer = _hparams_writer(os.path.join(root, run['name']))
    try:
      writer.add_summary(start)
      for tag in metric_tags:
        for step, value in run['metrics'].get(tag, []):
          if _finite_number(value):
            writer.add_summary(summary.scalar(tag, float(value)), int(step))
      writer.add_summary(end)
    finally:
      writer.close()
