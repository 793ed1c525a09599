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

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
  """A signal stopped the run at a phase boundary; everything written so far is complete."""

  def __init__(self, signal_name: str, phase: str, saved: bool = False):
    self.signal_name, self.phase, self.saved = signal_name, phase, saved
    super().__init__(f'stopped by {signal_name} {phase}')

  @property
  def exit_status(self) -> int:
    return 128 + getattr(signal, self.signal_name, signal.SIGTERM)


class _State:
  received: str | None = None
  depth = 0
  previous: dict = {}
  console_fd: int | None = None  # where the acknowledgement goes while fd 2 is silenced


def _handle(signum, frame):
  name = signal.Signals(signum).name
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
