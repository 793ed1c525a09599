"""Checks on config values, run before any work so a bad value costs nothing."""
from __future__ import annotations

from digitjax.data import SUPPORTED_DATASETS
from digitjax.errors import UserError


CONV_IMPLS = ('lax', 'im2col', 'winograd', 'mixed')


def conv_impls(conv_impl: str, num_convs: int) -> list[str]:
  """One formulation per conv layer from 'name' (every layer) or 'name,name,...' (one each)."""
  names = conv_impl.split(',')
  if len(names) == 1:
    names = names * num_convs
  if len(names) != num_convs or not all(n in CONV_IMPLS for n in names) or (
      len(set(names)) > 1 and 'mixed' in names):
    raise UserError(f'conv_impl {conv_impl!r}: expected one of {", ".join(CONV_IMPLS)}, or '
                    f'{num_convs} of lax/im2col/winograd separated by commas')
  return names


def _conv_impl_ok(model_config) -> bool:
  if model_config.conv_impl == 'auto':
    return True
  try:
    conv_impls(model_config.conv_impl, len(model_config.conv_features))
  except UserError:
    return False
  return True


def validate(config) -> None:
  """Raises UserError naming the first field whose value cannot work."""
  checks = [
      ('dataset', config.dataset in SUPPORTED_DATASETS, f'one of {SUPPORTED_DATASETS}'),
      ('batch_size', config.batch_size > 0, 'a positive integer'),
      ('eval_batch_size', config.eval_batch_size > 0, 'a positive integer'),
      ('num_epochs', config.num_epochs >= 1, 'at least 1'),
      ('learning_rate', config.learning_rate > 0, 'positive'),
      ('momentum', 0 <= config.momentum < 1, 'in [0, 1)'),
      ('validation_fraction', 0 <= config.validation_fraction < 1, 'in [0, 1)'),
      ('data.max_train_examples', config.data.max_train_examples >= 0, '0 (all) or positive'),
      ('checkpoint_keep', config.checkpoint_keep >= 1, 'at least 1'),
      ('ensemble_size', config.ensemble_size >= 1, 'at least 1'),
      ('ensemble_variants', len(config.ensemble_variants) != 1
       and all(isinstance(v, str) for v in config.ensemble_variants),
       "empty, or two or more strings of overrides (e.g. ('', 'model.batch_norm=True'))"),
      ('data.split_seed', config.data.split_seed >= -1, '-1 (= seed) or a seed >= 0'),
      ('model.conv_features', len(config.model.conv_features) >= 1
       and all(f > 0 for f in config.model.conv_features), 'a non-empty list of positive widths'),
      ('model.dense_features', config.model.dense_features > 0, 'positive'),
      ('model.num_classes', config.model.num_classes >= 2, 'at least 2'),
      ('input_pipeline', config.input_pipeline in ('auto', 'device', 'tfds'),
       "'auto', 'device' or 'tfds'"),
      ('chunk_steps', config.chunk_steps >= 1, 'at least 1'),
      ('input_pipeline', config.ensemble_size == 1 or config.input_pipeline != 'tfds',
       "'device' or 'auto' when ensemble_size > 1 (ensembles gather their batches on device)"),
      ('schedule', config.schedule in ('constant', 'cosine', 'onecycle'),
       "'constant', 'cosine' or 'onecycle'"),
      ('warmup_epochs', 0 <= config.warmup_epochs <= config.num_epochs
       and not (config.schedule == 'cosine' and config.warmup_epochs >= config.num_epochs),
       'in [0, num_epochs], and below num_epochs with the cosine schedule'),
      ('weight_decay', config.weight_decay >= 0, '0 or positive'),
      ('model.dropout_rate', 0 <= config.model.dropout_rate < 1, 'in [0, 1)'),
      ('augment.rotation', 0 <= config.augment.rotation <= 180, 'in [0, 180] degrees'),
      ('augment.zoom', 0 <= config.augment.zoom < 1, 'in [0, 1)'),
      ('augment.shift', 0 <= config.augment.shift < 1, 'in [0, 1)'),
      ('model.conv_impl', _conv_impl_ok(config.model),
       "'auto', 'lax', 'im2col', 'winograd' or 'mixed', or one of lax/im2col/winograd per conv "
       "layer separated by commas (e.g. 'lax,winograd,winograd')"),
      ('grad_chunks', config.grad_chunks >= 0 and (
          config.grad_chunks == 0 or config.batch_size % config.grad_chunks == 0),
       '0 (auto) or a divisor of batch_size'),
      ('grad_chunks', config.grad_chunks <= 1 or not config.model.batch_norm,
       '0 or 1 with model.batch_norm (BatchNorm normalizes by the whole batch)'),
      ('model.pool_impl', config.model.pool_impl in ('auto', 'lax', 'reshape'),
       "'auto', 'lax' or 'reshape'"),
  ]
  for field, ok, expected in checks:
    if not ok:
      value = config
      for part in field.split('.'):
        value = value[part]
      raise UserError(f'config.{field}={value!r} is invalid: it must be {expected}')
