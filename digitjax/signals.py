"""SIGINT and SIGTERM, safe in every phase.

A handler that only records the signal is installed for the whole of a run (launch.py installs
it before it imports anything heavy). Each phase looks at the record at its boundaries (start-up,
data preparation, compilation, each chunk of training steps, evaluation, plotting) and stops
there: no KeyboardInterrupt ever lands inside XLA's compiler or orbax's threads (which crashed
the interpreter, exit 139) or in a garbage-collection callback (which swallowed it). A second
signal is noted and ignored: the stop under way (a checkpoint being saved) completes.

Exit statuses (launch.py): 130 after SIGINT, 143 after SIGTERM (128 + the signal's number).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """A signal stopped the run at a phase boundary; everything written so far is complete.

  A KeyboardInterrupt: a notebook's `try: digitjax.train(...) except Exception:` lets a Ctrl-C
  through (after the checkpoint is saved) instead of going on with the next run."""

  def __init__(self, signal_name: str, phase: str, saved: bool = False):
    self.signal_name, self.phase, self.saved = signal_name, phase, saved
    super().__init__(f'stopped by {signal_name} {phase}')

  @property
  def exit_status(self) -> int:
    return 128 + getattr(signal, self.signal_name, signal.SIGTERM)


class _State:
  received: str | None = None
  count = 0  # signals received while recorded, the repeated ones included
  pauses: dict = {}  # phase -> the step from which to pause there (None: any), once each
  depth = 0
  previous: dict = {}
  console_fd: int | None = None  # where the acknowledgement goes while fd 2 is silenced


def _handle(signum, frame):
  name = signal.Signals(signum).name
  _State.count += 1
  if _State.received is None:
    _State.received = name
    line = f'{name} received: stopping at the next safe point'
    if _State.console_fd is None:
      print(line, file=sys.stderr, flush=True)
    else:
      os.write(_State.console_fd, (line + '\n').encode())
  else:
    logging.warning('%s received again: still stopping cleanly, please wait', name)


def install() -> None:
  """Records SIGINT/SIGTERM from now on, for the life of the process (launch.py)."""
  _State.depth += 1
  if _State.depth == 1:
    for sig in _HANDLED:
      try:
        _State.previous[sig] = signal.signal(sig, _handle)
      except ValueError:  # not the main thread: signals go to the main thread's handlers
        pass


def uninstall() -> None:
  _State.depth -= 1
  if _State.depth == 0:
    for sig, handler in _State.previous.items():
      signal.signal(sig, handler)
    _State.previous = {}
    _State.received = None


@contextlib.contextmanager
def recorded():
  """Signals are recorded, not raised, inside the block (library entry points use it, so a
  notebook's Ctrl-C stops digitjax.train cleanly too); the previous handlers come back after."""
  install()
  try:
    yield
  finally:
    uninstall()


def received() -> str | None:
  return _State.received


def check(phase: str) -> None:
  """Raises Interrupted if a signal came; `phase` says where the run stopped ('while
  compiling')."""
  if _State.received is not None:
    raise Interrupted(_State.received, phase)


@contextlib.contextmanager
def acknowledged_on(fd: int):
  """Inside the block a signal is acknowledged on `fd` (the console's stderr, saved while fd 2
  points at /dev/null to hide another library's start-up notices)."""
  previous, _State.console_fd = _State.console_fd, fd
  try:
    yield
  finally:
    _State.console_fd = previous


def ignore() -> None:
  """From now on SIGINT and SIGTERM do nothing (the run has stopped; only its exit is left)."""
  for sig in _HANDLED:
    signal.signal(sig, signal.SIG_IGN)


def note(name: str) -> None:
  """Records a stop agreed with another process (a signal it received)."""
  _State.received = _State.received or name


# ---------------------------------------------------------------------------------------------
# Phases: where a run is, and a debug option that holds it there (launch.py --debug_pause_at)

PHASES = {
    'starting': 'launch.py, once the flags are read, before anything is written',
    'preparing': 'before tfds prepares a data_dir (only when it has to)',
    'compiling': 'before the train step compiles',
    'step': 'at the first chunk boundary at or past step N (step:N)',
    'evaluating': 'before an epoch\'s validation',
    'saving': 'while an epoch\'s checkpoint is being written',
    'searching': "a search's step: its states and numbers changed, before lineage.jsonl and "
                 'the checkpoint record them',
    'testing': 'before the final evaluation on the test split',
    'selecting': "before a population evaluates its members' logits",
    'plotting': 'before the pictures are drawn',
    'exporting': 'export: after the SavedModel is written aside, before the ONNX model',
    'exiting': 'launch.py, once the results are complete, before the process exits',
}


def pause_at(spec: str) -> None:
  """Holds the run, once, at each phase `spec` names ('step:300,saving:300': at the first chunk
  boundary from step 300 on, then at the first save from step 300 on), until a signal comes
  (tests send it there, not after a sleep); each pause says so on stderr. '' pauses nowhere."""
  pauses = {}
  for item in filter(None, (p.strip() for p in spec.split(','))):
    phase, _, step = item.partition(':')
    if phase not in PHASES or (phase == 'step' and not step) or (
        step and not step.isdigit()):
      raise ValueError(f'--debug_pause_at: {item!r} is not a phase; give one or more of '
                      f'{", ".join("step:N" if p == "step" else p for p in PHASES)}, '
                      f'separated by commas (PHASE:N: from step N on)')
    pauses[phase] = int(step) if step else None
  _State.pauses = pauses


def reached(phase: str, step: int | None = None) -> None:
  """Marks that the run reached `phase` (a key of PHASES); holds it there if asked to."""
  if phase not in _State.pauses:
    return
  threshold = _State.pauses[phase]
  if threshold is not None and (step is None or step < threshold):
    return
  del _State.pauses[phase]
  seen = _State.count
  where = f'step {step}' if phase == 'step' else phase + (f' (step {step})' if step else '')
  line = f'digitjax: paused at {where} (--debug_pause_at); send SIGINT or SIGTERM to go on'

  if _State.console_fd is None:
    print(line, file=sys.stderr, flush=True)
  else:
    os.write(_State.console_fd, (line + '\n').encode())
  while _State.count == seen:
    time.sleep(0.01)
