"""Checkpoints with orbax: one CheckpointManager under workdir/checkpoints.

Each checkpoint holds the train state (step, params, optimizer state) and a small JSON record
(epoch, seconds trained, the config fields a resumed run must share). The latest `keep` are kept,
plus the best by validation accuracy. Restoring tries the newest first and falls back, loudly,
to older ones when a checkpoint is damaged; it never starts over silently.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from digitjax.errors import UserError

# Fields that must match between a checkpoint and the config resuming it.
RESUME_FIELDS = ('dataset', 'seed', 'batch_size', 'validation_fraction', 'data.max_train_examples',
                 'model.conv_features', 'model.pool_after', 'model.dense_features',
                 'model.num_classes')


def _get(config_dict: dict, dotted: str):
  value = config_dict
  for part in dotted.split('.'):
    value = value.get(part) if isinstance(value, dict) else None
  return list(value) if isinstance(value, (tuple, list)) else value


def resume_fields(config_dict: dict) -> dict[str, Any]:
  return {f: _get(config_dict, f) for f in RESUME_FIELDS}


class Checkpoints:
  """Thin wrapper over ocp.CheckpointManager for this package's state and metadata."""

  def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m['val_accuracy'], n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                           read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    scored = [(m['val_accuracy'], s) for s in self.steps()
              if (m := self.manager.metrics(s)) and 'val_accuracy' in m]
    return max(scored)[1] if scored else None

  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics=metrics, force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, target):
    """Restores `step` into the structure, shapes and shardings of `target`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def restore_newest(self, target, config_dict: dict, steps: list[int] | None = None):
    """(state, meta, step) from the newest readable checkpoint, or (None, None, None) if none.

    A damaged checkpoint is reported and skipped; a checkpoint of another config is an error.
    """
    steps = sorted(self.steps() if steps is None else steps, reverse=True)
    errors = []
    for step in steps:
      try:
        meta = self.read_meta(step)
      except Exception as e:  # damaged metadata: try an older checkpoint
        errors.append(f'step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}')
        logging.warning('Checkpoint %s/%d is unreadable (%s); trying an older one',
                        self.directory, step, errors[-1])
        continue
      self.check_compatible(meta, config_dict, step)
      try:
        state, meta = self.restore(step, target)
        return state, meta, step
      except Exception as e:
        errors.append(f'step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}')
        logging.warning('Checkpoint %s/%d is unreadable (%s); trying an older one',
                        self.directory, step, errors[-1])
    if errors:
      raise UserError(f'no readable checkpoint in {self.directory} ({"; ".join(errors)}); move '
                      f'the damaged checkpoints away to start over, or use another --workdir')
    return None, None, None

  def check_compatible(self, meta: dict, config_dict: dict, step: int) -> None:
    saved, current = meta.get('resume_fields', {}), resume_fields(config_dict)
    diffs = [f'{k}={saved[k]!r} in the checkpoint but {current[k]!r} in the config'
             for k in RESUME_FIELDS if k in saved and saved[k] != current[k]]
    if diffs:
      raise UserError(f'checkpoint {self.directory}/{step} does not fit the config: '
                      f'{"; ".join(diffs)}; use the checkpoint\'s settings or a new --workdir')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
