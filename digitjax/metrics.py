"""Where metrics go: the console (Keras-like lines, a progress bar on a terminal), JSON lines
and TensorBoard event files under the workdir. Only process 0 writes."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import numpy as np

from digitjax import parallel


def log_softmax64(logits: np.ndarray) -> np.ndarray:
  """Log-probabilities along the last axis, in float64 on the host (metrics, ensembles)."""
  logp = np.asarray(logits, np.float64)
  logp = logp - logp.max(-1, keepdims=True)
  return logp - np.log(np.exp(logp).sum(-1, keepdims=True))


def log(msg: str = '') -> None:
  if parallel.is_main_process():
    print(msg, flush=True)


class MetricWriter:
  """Appends {'step':..., **metrics} to workdir/metrics.jsonl and to TensorBoard scalars."""

  def __init__(self, workdir: str):
    self.enabled = parallel.is_main_process()
    self._tb = None
    if not self.enabled:
      return
    self._jsonl = os.path.join(workdir, 'metrics.jsonl')
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), flush_secs=10)
    except ImportError:  # optional: JSON lines still carry everything
      logging.warning('tensorboardX is not installed; TensorBoard files are not written')

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self._jsonl, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    if self._tb is not None:
      for name, value in metrics.items():
        if isinstance(value, (int, float)):
          self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_history(workdir: str) -> list[dict]:
  """The per-epoch records of metrics.jsonl, the last one for each epoch (runs may resume)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  by_epoch = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if 'epoch' in record:
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
