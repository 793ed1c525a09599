"""Ensembles of model variants: one vmapped seed ensemble per variant, all members averaged.

`config.ensemble_variants` lists variants of the config, each a string of overrides separated by
';' ('model.batch_norm=True', or '' for the config as it is). Variant i is an ordinary run of its
config, trained (checkpointed, resumed) in workdir/variant<i> with its `ensemble_size` members
vmapped: vmap needs members of one architecture, so each variant is a program of its own. The
ensemble of every member of every variant predicts the mean of their softmax probabilities;
workdir/results.json holds its figures, each member's and each variant's. Members of different
architectures make more different mistakes than seeds of one (README "Results").
"""
from __future__ import annotations

import ast
import json
import os

import jax
import numpy as np

from digitjax import configlib, data, ensemble, parallel, train
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError
from digitjax.metrics import log

# Fields every variant shares: the data (members are combined example by example) and the
# variants themselves.
_SHARED = ('dataset', 'validation_fraction', 'data.', 'seed', 'ensemble_variants',
           'eval_batch_size', 'distributed.', 'compilation_cache_dir')


def variant_dir(workdir: str, i: int) -> str:
  return os.path.join(workdir, f'variant{i}')


def variant_configs(config) -> list:
  """The config of each variant: `config` with the variant's overrides and no variants."""
  configs = []
  for text in config.ensemble_variants:
    variant = config.copy_and_resolve_references()
    variant.ensemble_variants = ()
    for item in filter(None, (part.strip() for part in text.split(';'))):
      key, value = _override(item, text)
      target = variant
      *parents, leaf = key.split('.')
      try:
        for part in parents:
          target = target[part]
        target[leaf]  # an unknown field is an error, not a new one
      except (KeyError, AttributeError, TypeError):
        raise UserError(f'config.ensemble_variants: {text!r} sets {key}, which is not a config '
                        f'field; use the names in configs/default.py') from None
      try:
        target[leaf] = value  # ConfigDict checks the type
      except TypeError:
        raise UserError(f'config.ensemble_variants: {text!r} sets {key} to {value!r}, a value '
                        f'of another type than the field\'s ({type(target[leaf]).__name__})'
                        ) from None
    configlib.validate(variant)
    configs.append(variant)
  return configs


def _override(item: str, text: str):
  key, sep, value = item.partition('=')
  key = key.strip()
  if not sep or not key:
    raise UserError(f'config.ensemble_variants: {text!r} is not a list of field=value '
                    f"separated by ';' (e.g. 'model.batch_norm=True')")
  if any(key == s or (s.endswith('.') and key.startswith(s)) for s in _SHARED):
    raise UserError(f'config.ensemble_variants: {text!r} sets {key}, which all variants share '
                    f'(their members are averaged on the same data); set it for the whole run')
  try:
    return key, ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    return key, value.strip()  # a bare word: a string value (e.g. schedule=cosine)


def train_and_evaluate(config, workdir: str) -> list:
  """Trains each variant in workdir/variant<i> (resuming any already started), then evaluates
  the ensemble of all their members into workdir/results.json; returns the variants' states."""
  configlib.validate(config)
  configs = variant_configs(config)  # every variant's config is checked before any training
  with workdir_lib.claim(workdir, exclusive=parallel.is_main_process()):
    states = []
    for i, (variant, text) in enumerate(zip(configs, config.ensemble_variants)):
      log(f'Variant {i + 1}/{len(configs)} ({text or "the config as it is"}) in '
          f'{variant_dir(workdir, i)}')
      states.append(train.train_and_evaluate(variant, variant_dir(workdir, i)))
    results = _evaluate(config, configs, states, workdir)
    if parallel.is_main_process():
      train.write_json_atomic(os.path.join(workdir, 'results.json'), results)
  return states


def _members(configs, states):
  """images -> (members, N, classes): the logits of every member of every variant."""
  mesh = parallel.make_mesh()
  evaluators = [train.Evaluator.for_config(variant, mesh) for variant in configs]

  def member_logits(images):
    parts = [evaluator.logits(state, images) for evaluator, state in zip(evaluators, states)]
    return np.concatenate([p if p.ndim == 3 else p[None] for p in parts])

  return member_logits


def _evaluate(config, configs, states, workdir: str) -> dict:
  """The combined figures on validation and test, each member's and each variant's (read from
  the variants' results.json, which only the main process writes: {} elsewhere)."""
  splits = data.load_splits(configs[0])
  member_logits = _members(configs, states)
  test, val = (train.evaluation_metrics(member_logits(split['image']), split['label'])
               for split in (splits.test, splits.val))
  log(f'Ensemble of {len(test["members"])} members from {len(configs)} variants: test loss '
      f'{test["loss"]:.4f} - accuracy {test["accuracy"]:.4f}'
      + ensemble.describe('test', ensemble.member_summary('test', test)))
  if not parallel.is_main_process():
    return {}
  variants = []
  for i, text in enumerate(config.ensemble_variants):
    with open(os.path.join(variant_dir(workdir, i), 'results.json')) as f:
      part = json.load(f)
    variants.append({'overrides': text, 'workdir': os.path.basename(variant_dir(workdir, i)),
                     **{k: part[k] for k in ('test_accuracy', 'test_loss', 'num_params',
                                             'train_seconds', 'compile_seconds')},
                     **{k: v for k, v in part.items() if k.startswith('member_test_')}})
  return {
      'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
      **ensemble.member_summary('test', test),
      'val_accuracy': val['accuracy'], 'val_loss': val['loss'],
      **ensemble.member_summary('val', val),
      'train_seconds': sum(v['train_seconds'] for v in variants),
      'compile_seconds': sum(v['compile_seconds'] for v in variants),
      'variants': variants, 'devices': jax.device_count(), 'backend': jax.default_backend(),
      'config': config.to_dict(),
  }


def restore_members(config, workdir: str, checkpoint: str, mode: str):
  """(images -> member logits, steps): every variant's `checkpoint` (its own best, latest or a
  step) restored, for --mode=eval and predict (evaluate.restore_members)."""
  from digitjax import evaluate
  configs = variant_configs(config)
  restored = [evaluate.restore(variant, variant_dir(workdir, i), checkpoint, mode)
              for i, variant in enumerate(configs)]
  return _members(configs, [state for state, *_ in restored]), [step for _, step, *_ in restored]
