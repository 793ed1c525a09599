"""The config's meaning: its checks, the one dotted-path helper, the fields a checkpoint must
share with a config, and what its 'auto' values mean: on a backend and device layout
(`resolve`), for the validation holdout (`split_seed`: -1 = seed) and the compilation cache
(`compilation_cache_dir`). distributed.mode's 'auto' alone is decided in parallel.py: it reads
the cluster's environment, before JAX starts and before the config is validated.

Nothing here imports the rest of digitjax (only errors), so every layer may use it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from digitjax.errors import UserError

SUPPORTED_DATASETS = ('mnist', 'fashion_mnist')
CONV_IMPLS = ('lax', 'im2col', 'winograd', 'mixed')
SCHEDULES = ('constant', 'cosine', 'onecycle')
OPTIMIZERS = ('sgd', 'adam')
DTYPES = ('float32', 'bfloat16')
DATASET_LABELS = {'mnist': 10, 'fashion_mnist': 10}  # the classes a model outputs (model.CNN's
#                                                       10 is every dataset's: test_configlib)
# parallel.py checks these before it joins a cluster (launch.py joins before validating): the
# same tuples there, pinned equal by tests/test_config_checks.py.
DISTRIBUTED_MODES = ('auto', 'on', 'off')
CPU_COLLECTIVES = ('gloo', 'mpi', 'megascale', '')
MAX_EPOCHS = 10_000
# The sections validate's checks read across fields (each checked present before any check).
_SECTIONS_READ = ('model', 'data', 'augment', 'plateau', 'sweep', 'distributed')

# The fields a checkpoint must share with the config that resumes it (the batch size shapes the
# example order, the model the arrays (and model.input_norm what inputs the weights expect),
# the data fields which examples are trained on).
MODEL_FIELDS = ('model.conv_features', 'model.kernel_sizes', 'model.pool_after',
                'model.dense_features', 'model.batch_norm', 'model.input_norm')
SPLIT_FIELDS = ('dataset', 'seed', 'validation_fraction', 'data.max_train_examples',
                'data.split_seed')
# model.dtype is not one of them: it changes the arithmetic, not the arrays (the parameters and
# the optimizer state are float32 under either dtype), so a checkpoint restores under both.
RESUME_FIELDS = SPLIT_FIELDS[:2] + ('batch_size',) + SPLIT_FIELDS[2:] + MODEL_FIELDS
# ... and with a config that only uses it: predict needs the architecture; eval and report also
# the data's split (they evaluate a split of it).
FIT_FIELDS = {'predict': MODEL_FIELDS, 'export': MODEL_FIELDS,
              'eval': SPLIT_FIELDS + MODEL_FIELDS, 'report': SPLIT_FIELDS + MODEL_FIELDS}

# Numeric fields that members of one vmapped group may set differently: each becomes a
# per-member array in the group's one program (steps.py). Every other field is structure.
MEMBER_NUMERIC_FIELDS = ('seed', 'learning_rate', 'momentum', 'weight_decay', 'warmup_epochs',
                         'onecycle_pct_start', 'augment.rotation', 'augment.zoom',
                         'augment.shift', 'model.dropout_rate', 'label_smoothing')
# Fields every member of a population shares: the data (members are compared and combined
# example by example), where the run lives, and the population itself.
SHARED_FIELDS = ('dataset', 'validation_fraction', 'data.', 'distributed.',
                 'compilation_cache_dir', 'sweep.', 'search.', 'eval_batch_size', 'plots',
                 'log_every_steps')

# Fields added after workdirs were trained, with the values that do what was done before them:
# a workdir's stored config that lacks one gets it (stored_config.py).
ADDED_FIELDS = {'model.dtype': 'float32', 'model.kernel_sizes': (),
                'model.conv_init': 'he_uniform', 'optimizer': 'sgd', 'adam_b1': 0.9,
                'adam_b2': 0.999, 'sweep.allow_large': False, 'ema_decay': 0.0,
                'search': {'kind': 'grid', 'space': '', 'size': 8, 'ready_steps': 0,
                           'metric': 'val_loss', 'sampler': 'tpe', 'quantile': 0.25,
                           'resample_probability': 0.25, 'perturb': (0.8, 1.2), 'eta': 3,
                           'schedule': ''},
                'label_smoothing': 0.0, 'augment.elastic_alpha': 0.0,
                'augment.elastic_sigma': 4.0, 'augment.stroke': 0.0,
                'model.dense_init': 'keras', 'model.input_norm': (0.0, 1.0)}
# A field added to configs/default.py must be added here too: stored_config.py refuses a stored
# config without one of default.py's fields as damaged (naming the file and the field).

# Fields that no longer exist, and what replaced them: named in the error instead of a typo hint.
REMOVED_FIELDS = {
    'ensemble_size': "seed ensembles are populations now: --config.sweep.grid='seed=0,1,2' "
                     "--config.sweep.select=ensemble",
    'ensemble_variants': "ensembles of variants are populations now: --config.sweep.members="
                         "\"('', 'model.batch_norm=True')\" --config.sweep.select=ensemble",
    'model.num_classes': "the classes are config.dataset's (configlib.DATASET_LABELS: 10 for "
                         "mnist and fashion_mnist); leave it out",
}


# ---------------------------------------------------------------------------------------------
# Dotted paths


def _section(record: dict, dotted: str) -> tuple[dict | None, str]:
  """(the section of a stored config that holds field `dotted`, or None, and its leaf name)."""
  *parents, leaf = dotted.split('.')
  target = record
  for part in parents:
    target = target.get(part) if isinstance(target, dict) else None
  return (target if isinstance(target, dict) else None), leaf


def without_removed_fields(record: dict) -> dict:
  """A stored config (a plain dict) without the fields REMOVED_FIELDS names (a workdir trained
  before they went holds them)."""
  for dotted in REMOVED_FIELDS:
    target, leaf = _section(record, dotted)
    if target is not None:
      target.pop(leaf, None)
  return record


def with_added_fields(record: dict) -> dict:
  """A stored config (a plain dict) with every field of ADDED_FIELDS it lacks. A section that
  is absent or not a section is left as it is, for `stored_mismatch` to name."""
  for dotted, value in ADDED_FIELDS.items():
    target, leaf = _section(record, dotted)
    if target is not None:
      target.setdefault(leaf, value)
  return record


def stored_mismatch(record: dict, reference: dict, prefix: str = '') -> str | None:
  """The first field of a stored config (`record`, a plain dict with tuples for lists) that is
  absent or not of the kind `reference`'s is (configs/default.py's, as a dict): 'NAME is VALUE
  (a TYPE), expected a KIND'; None when every field is there. An int in a float field becomes
  the float (as ConfigDict would make it)."""
  for key, ref in reference.items():
    name = prefix + key
    if key not in record:
      return f'{name} is missing'
    value = record[key]
    if isinstance(ref, dict):
      if not isinstance(value, dict):
        return _described(name, value, 'a section')
      inner = stored_mismatch(value, ref, name + '.')
      if inner:
        return inner
    elif not _same_kind(value, ref):
      return _described(name, value, _kind(ref))
    elif isinstance(ref, float):
      record[key] = float(value)
  return None


def _same_kind(value, ref) -> bool:
  if isinstance(ref, bool):
    return isinstance(value, bool)
  if isinstance(ref, int):
    return _int(value)
  if isinstance(ref, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(ref, tuple):
    return isinstance(value, tuple) and (not ref or all(_same_kind(v, ref[0]) for v in value))
  return ref is None or type(value) is type(ref)


def _kind(ref) -> str:
  if isinstance(ref, tuple):
    return f'a tuple of {type(ref[0]).__name__}' if ref else 'a tuple'
  return _a(type(ref).__name__)


def _a(name: str) -> str:
  return f'{"an" if name[0] in "aeiou" else "a"} {name}'


def _described(name: str, value, expected: str) -> str:
  shown = repr(value)
  shown = shown if len(shown) <= 60 else shown[:57] + '...'
  if value is None or type(value) in (tuple, dict):  # the type is plain from the value
    return f'{name} is {shown}, expected {expected}'
  return f'{name} is {shown} ({_a(type(value).__name__)}), expected {expected}'


def get(config, dotted: str, default: Any = KeyError) -> Any:
  """config['a']['b'] for 'a.b', on a ConfigDict or a plain dict (a checkpoint's record)."""
  value = config
  for part in dotted.split('.'):
    try:
      value = value[part]
    except (KeyError, TypeError, AttributeError):
      if default is KeyError:
        raise KeyError(dotted) from None
      return default
  return value


def set_field(config, dotted: str, value: Any) -> None:
  """Sets an existing field; an unknown one is a UserError naming the closest real name."""
  *parents, leaf = dotted.split('.')
  target = config
  for part in parents:
    target = target[part] if _has(target, part) else None
    if target is None:
      raise unknown_field(config, dotted)
  if not _has(target, leaf) or hasattr(target[leaf], 'keys'):
    raise unknown_field(config, dotted)
  try:
    target[leaf] = value  # ConfigDict checks the type
  except (TypeError, ValueError) as e:
    raise UserError(f'config.{dotted}={value!r} has the wrong type: the field holds '
                    f'{type(target[leaf]).__name__} values ({e})') from None


def _has(config, key: str) -> bool:
  try:
    return key in config
  except TypeError:
    return False


def field_names(config, prefix: str = '') -> list[str]:
  """Every leaf field's dotted name."""
  names = []
  for key in config.keys():
    value = config[key]
    if hasattr(value, 'keys'):
      names += field_names(value, f'{prefix}{key}.')
    else:
      names.append(prefix + key)
  return names


def unknown_field(config, dotted: str) -> UserError:
  if dotted in REMOVED_FIELDS:
    return UserError(f'config.{dotted} was removed: {REMOVED_FIELDS[dotted]}')
  close = difflib.get_close_matches(dotted, field_names(config), n=1)
  hint = f"; did you mean '{close[0]}'?" if close else '; see configs/default.py for the fields'
  return UserError(f"config.{dotted} is not a config field{hint}")


def matches(dotted: str, prefixes) -> bool:
  """Whether `dotted` is one of `prefixes` (a name, or 'section.' for all of a section)."""
  return any(dotted == p or (p.endswith('.') and dotted.startswith(p)) for p in prefixes)


# ---------------------------------------------------------------------------------------------
# Checks


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


def kernel_sizes(model_config) -> tuple[int, ...]:
  """Each conv layer's kernel size: config.model.kernel_sizes, or 3 for all when it is ()."""
  return tuple(model_config.kernel_sizes) or (3,) * len(model_config.conv_features)


def _kernel_sizes_ok(model_config, image_size: int = 28) -> bool:
  sizes = kernel_sizes(model_config)
  if len(sizes) != len(model_config.conv_features) or not all(
      isinstance(k, int) and k >= 1 for k in sizes):
    return False
  for i, k in enumerate(sizes):  # the maps must stay at least 1x1 (pooling halves them)
    image_size -= k - 1
    if i in model_config.pool_after:
      image_size //= 2
    if image_size < 1:
      return False
  return True


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _in_unit(x, low_closed: bool = True) -> bool:
  """x in [0, 1) (or (0, 1) when not `low_closed`), a finite number."""
  return _finite(x) and (0 <= x if low_closed else 0 < x) and x < 1


def _data_and_optimizer_checks(c) -> list:
  return [
      ('dataset', lambda v: v in SUPPORTED_DATASETS, f'one of {SUPPORTED_DATASETS}'),
      ('batch_size', lambda v: _int(v) and v > 0, 'a positive integer'),
      ('eval_batch_size', lambda v: _int(v) and v > 0, 'a positive integer'),
      ('num_epochs', lambda v: _finite(v) and 0 < v <= MAX_EPOCHS,
       f'a number of passes over the training examples in (0, {MAX_EPOCHS}] (fractions '
       f'allowed, e.g. 0.2)'),
      ('learning_rate', lambda v: _finite(v) and v >= 0,
       '0 (a frozen member, for comparisons) or positive'),
      ('momentum', _in_unit, 'in [0, 1)'),
      ('optimizer', lambda v: v in OPTIMIZERS, "'sgd' or 'adam'"),
      ('adam_b1', _in_unit, 'in [0, 1)'),
      ('adam_b2', _in_unit, 'in [0, 1)'),
      ('nesterov', lambda v: not (v and c.optimizer == 'adam'),
       "False with optimizer='adam' (Nesterov momentum is SGD's)"),
      ('validation_fraction', _in_unit, 'in [0, 1)'),
      ('data.max_train_examples', lambda v: _int(v) and v >= 0, '0 (all) or positive'),
      ('checkpoint_keep', lambda v: _int(v) and v >= 1, 'at least 1'),
      ('data.split_seed', lambda v: _int(v) and v >= -1, '-1 (= seed) or a seed >= 0'),
      ('seed', lambda v: _int(v) and v >= 0, 'a seed >= 0'),
      ('schedule', lambda v: v in SCHEDULES, "'constant', 'cosine' or 'onecycle'"),
      ('warmup_epochs', lambda v: _finite(v) and 0 <= v <= c.num_epochs
       and not (c.schedule == 'cosine' and v >= c.num_epochs),
       'in [0, num_epochs], and below num_epochs with the cosine schedule'),
      ('onecycle_pct_start', lambda v: _in_unit(v, low_closed=False), 'in (0, 1)'),
      ('weight_decay', lambda v: _finite(v) and v >= 0, '0 or positive'),
      ('ema_decay', _in_unit, 'in [0, 1) (0 = no weight averaging; e.g. 0.999)'),
      # optax's reduce_on_plateau refuses a factor outside (0, 1) only once the data is loaded.
      ('plateau.factor', lambda v: _in_unit(v, low_closed=False), 'in (0, 1)'),
      ('plateau.patience', lambda v: _int(v) and v >= 0, 'an integer >= 0'),
      ('plateau.cooldown', lambda v: _int(v) and v >= 0, 'an integer >= 0'),
      ('augment.rotation', lambda v: _finite(v) and 0 <= v <= 180, 'in [0, 180] degrees'),
      ('augment.zoom', _in_unit, 'in [0, 1)'),
      ('augment.shift', _in_unit, 'in [0, 1)'),
      ('augment.elastic_alpha', lambda v: _finite(v) and v >= 0,
       '0 (no elastic distortion) or a positive number of pixels (Simard et al. used 34)'),
      ('augment.elastic_sigma', lambda v: _finite(v) and 0 < v <= 28,
       'in (0, 28] pixels (Simard et al. used 4)'),
      ('augment.stroke', lambda v: _finite(v) and 0 <= v <= 0.5,
       'a probability in [0, 0.5] (each image thickened with it and thinned with it; 0 = off)'),
      ('label_smoothing', _in_unit, 'in [0, 1) (0 = plain cross-entropy)'),
  ]


def _model_checks(c) -> list:
  m = c.model
  return [
      ('model.conv_features', lambda v: isinstance(v, (tuple, list)) and len(v) >= 1
       and all(_int(f) and f > 0 for f in v), 'a non-empty list of positive widths'),
      ('model.kernel_sizes', lambda v: isinstance(v, (tuple, list)) and _kernel_sizes_ok(m),
       '() (3x3 everywhere) or one size >= 1 per conv layer, leaving 28x28 images a map of at '
       'least 1x1'),
      ('model.pool_after', lambda v: isinstance(v, (tuple, list)) and all(_int(i) for i in v),
       'a list of conv layer indices (0-based)'),
      ('model.dense_features', lambda v: _int(v) and v > 0, 'positive'),
      ('model.dropout_rate', _in_unit, 'in [0, 1)'),
      ('model.conv_impl', lambda v: isinstance(v, str) and _conv_impl_ok(m),
       "'auto', 'lax', 'im2col', 'winograd' or 'mixed', or one of lax/im2col/winograd per conv "
       "layer separated by commas (e.g. 'lax,winograd,winograd')"),
      ('model.pool_impl', lambda v: v in ('auto', 'lax', 'reshape'), "'auto', 'lax' or 'reshape'"),
      ('model.dtype', lambda v: v in DTYPES, "'float32' or 'bfloat16'"),
      ('model.conv_init', lambda v: v in ('he_uniform', 'torch'), "'he_uniform' or 'torch'"),
      ('model.dense_init', lambda v: v in ('keras', 'torch'), "'keras' or 'torch'"),
      ('model.input_norm', _input_norm_ok,
       'two numbers (mean, std) with std > 0, e.g. (0.1307, 0.3081) for MNIST; (0, 1) = none'),
  ]


def _input_norm_ok(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                  for x in v) and v[1] > 0)


def _run_checks(c) -> list:
  return [
      ('input_pipeline', lambda v: v in ('auto', 'device', 'tfds'), "'auto', 'device' or 'tfds'"),
      ('chunk_steps', lambda v: _int(v) and v >= 1, 'at least 1'),
      ('grad_chunks', lambda v: _int(v) and v >= 0 and (v == 0 or c.batch_size % v == 0),
       '0 (auto) or a divisor of batch_size'),
      ('grad_chunks', lambda v: v <= 1 or not c.model.batch_norm,
       '0 or 1 with model.batch_norm (BatchNorm normalizes by the whole batch)'),
      ('sweep.execution', lambda v: v in ('auto', 'map', 'vmap'), "'auto', 'map' or 'vmap'"),
      ('log_every_steps', lambda v: _int(v) and v >= 0, '0 (epoch ends only) or positive'),
      ('distributed.mode', lambda v: v in DISTRIBUTED_MODES, "'auto', 'on' or 'off'"),
      ('distributed.cpu_collectives', lambda v: v in CPU_COLLECTIVES,
       "'gloo', 'mpi', 'megascale' or '' (JAX's default)"),
      ('distributed.coordinator_address', lambda v: isinstance(v, str),
       "'host:port' or '' (from the environment)"),
      ('distributed.num_processes', lambda v: _int(v) and v >= 0,
       '0 (from the environment) or positive'),
      ('distributed.process_id', lambda v: _int(v) and v >= -1,
       '-1 (from the environment) or an id >= 0'),
      ('distributed.initialization_timeout', lambda v: _int(v) and v > 0,
       'a positive number of seconds'),
  ]


_MISSING = object()


def validate(config) -> None:
  """Raises UserError naming the first field whose value cannot work: absent, of the wrong
  type, or out of range (a config built by hand or read from a damaged file, too)."""
  for field in _SECTIONS_READ:
    if get(config, field, _MISSING) is _MISSING:
      raise UserError(f'config.{field} is missing; every config has it (configs/default.py)')
  for checks in (_data_and_optimizer_checks, _model_checks, _run_checks):
    for field, ok, expected in checks(config):
      value = get(config, field, _MISSING)
      if value is _MISSING:
        raise UserError(f'config.{field} is missing; every config has it (configs/default.py)')
      try:
        good = bool(ok(value))
      except (TypeError, ValueError, AttributeError, KeyError):  # a wrong type in a field read
        good = False
      if not good:
        raise UserError(f'config.{field}={value!r} is invalid: it must be {expected}')


def total_steps(num_epochs: float, steps_per_epoch: int) -> int:
  """Training steps of a run: num_epochs may be fractional (the last epoch is then partial)."""
  return int(round(num_epochs * steps_per_epoch))


def compilation_cache_dir(config) -> str:
  """JAX's persistent cache: 'auto' = $XDG_CACHE_HOME/digitjax/jax (~/.cache by default)."""
  import os
  if config.compilation_cache_dir != 'auto':
    return os.path.expanduser(config.compilation_cache_dir)
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'digitjax', 'jax')


def split_seed(config) -> int:
  """Seed of the validation holdout: data.split_seed, or `seed` when it is -1 (the default)."""
  return config.seed if config.data.split_seed < 0 else config.data.split_seed


# ---------------------------------------------------------------------------------------------
# 'auto', resolved


@dataclasses.dataclass(frozen=True)
class Choices:
  """What the 'auto' fields of a config mean on this backend and device layout."""
  backend: str
  input_pipeline: str      # 'device' (lax.scan over a device-resident split) | 'tfds'
  conv_impl: str           # the training step's convolutions
  pool_impl: str           # ... and pooling
  eval_conv_impl: str      # evaluation and prediction (forward only)
  eval_pool_impl: str
  grad_chunks: int         # the batch's gradient summed over this many sub-batches
  execution: str           # members of a group: 'map' (one after another) | 'vmap'

  def line(self) -> str:
    return (f'{self.input_pipeline} input, {self.conv_impl} convolutions, gradient in '
            f'{self.grad_chunks} chunk(s)')


def resolve(config, backend: str | None = None, data_devices: int = 1,
            group_size: int = 1) -> Choices:
  """Every 'auto' choice of `config` for a group of `group_size` members whose batches are
  split over `data_devices` devices, on `backend` (default: JAX's). Measured reasons:

  - input_pipeline 'auto' = 'device' everywhere: on this 2-core CPU the scan over the
    device-resident split ran the tutorial's epoch at 7.27 ms/step against 8.52 for per-step host
    batches (benchmarks/compare.py); on accelerators it saves a copy and a dispatch per step.
  - conv_impl 'auto': on CPU 'im2col' inside lax.scan (XLA:CPU's own convolution is far slower
    there) and 'mixed' per step; XLA's own elsewhere. Evaluation (forward only) uses XLA's own on
    every backend: its forward pass is the fastest measured (benchmarks/layers.py --inference).
  - pool_impl 'auto': 'reshape' on CPU (XLA:CPU's select_and_scatter gradient is slow), XLA's
    elsewhere.
  - grad_chunks 0 = 2 on one CPU device, where the two halves keep both cores busy (~8% faster
    steps at batch 32), else 1: accelerators are parallel within each op, a split of a batch
    sharded over devices would reshard it, a vmapped group's products are already K times
    larger, and BatchNorm needs the whole batch.
  - sweep.execution 'auto': 'map' on CPU, where one model's step already keeps both cores busy
    and vmapped members ran slower than the same members one after another (README
    "Experiments"); 'vmap' on GPU and TPU, which one small model leaves mostly idle.
  """
  if backend is None:
    import jax
    backend = jax.default_backend()
  cpu = backend == 'cpu'
  execution = config.sweep.execution
  if execution == 'auto':
    execution = 'map' if cpu else 'vmap'
  if group_size == 1:
    execution = 'map'
  input_pipeline = 'device' if config.input_pipeline == 'auto' else config.input_pipeline
  in_scan = input_pipeline == 'device'
  pick = lambda value, cpu_choice, other: value if value != 'auto' else (
      cpu_choice if cpu else other)
  grad_chunks = config.grad_chunks or (
      2 if cpu and data_devices == 1 and execution == 'map' and config.batch_size % 2 == 0
      and not config.model.batch_norm else 1)
  return Choices(
      backend=backend, input_pipeline=input_pipeline,
      conv_impl=pick(config.model.conv_impl, 'im2col' if in_scan else 'mixed', 'lax'),
      pool_impl=pick(config.model.pool_impl, 'reshape', 'lax'),
      eval_conv_impl=pick(config.model.conv_impl, 'lax', 'lax'),
      eval_pool_impl=pick(config.model.pool_impl, 'lax', 'lax'),
      grad_chunks=grad_chunks, execution=execution)
