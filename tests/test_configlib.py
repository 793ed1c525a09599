"""The config's meaning: checks, every config file, the 'auto' choices per backend."""
import importlib
import pathlib

import pytest

from conftest import ROOT
from digitjax import configlib
from digitjax.errors import UserError

CONFIG_FILES = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_every_config_file_loads_and_validates(name):
  from digitjax import members as members_lib
  # As a module of the configs package: a bare 'speedrun' could be benchmarks/speedrun.py.
  config = importlib.import_module(f'configs.{name}').get_config()
  configlib.validate(config)
  members = members_lib.members_of(config, '/nonexistent')  # every member checked, nothing made
  assert members
  assert not pathlib.Path('/nonexistent').exists()


def test_the_config_files_are_what_their_docstrings_say():
  import default, ensemble, sweep
  from digitjax import members as members_lib
  base = default.get_config()
  assert (base.batch_size, base.num_epochs, base.learning_rate, base.momentum) == (32, 10, 0.01,
                                                                                     0.9)
  members = members_lib.members_of(sweep.get_config(), '/w')
  assert [m.name for m in members][:4] == ['learning_rate=0.003,seed=0',
                                           'learning_rate=0.003,seed=1',
                                           'learning_rate=0.003,seed=2',
                                           'learning_rate=0.01,seed=0']
  assert len(members) == 12 and len(members_lib.groups_of(members)) == 1
  members = members_lib.members_of(ensemble.get_config(), '/w')
  assert [m.config.model.batch_norm for m in members] == [False] * 3 + [True] * 3
  assert [m.config.seed for m in members] == [0, 1, 2] * 2
  assert {m.config.data.split_seed for m in members} == {0}  # one holdout for all
  assert len(members_lib.groups_of(members)) == 2


@pytest.mark.parametrize('field, value, message', [
    ('batch_size', -8, 'config.batch_size=-8 is invalid: it must be a positive integer'),
    ('learning_rate', -0.01, 'config.learning_rate=-0.01 is invalid: it must be 0 (a frozen '
                             'member, for comparisons) or positive'),
    ('validation_fraction', 1.0, 'config.validation_fraction=1.0 is invalid: it must be in [0, 1)'),
    ('dataset', 'cifar10',
     "config.dataset='cifar10' is invalid: it must be one of ('mnist', 'fashion_mnist')"),
    ('num_epochs', 0.0, 'config.num_epochs=0.0 is invalid: it must be a number of passes'),
    ('num_epochs', float('inf'), 'config.num_epochs=inf is invalid'),
    ('num_epochs', 1e30, 'config.num_epochs=1e+30 is invalid'),
    ('momentum', 1.0, 'config.momentum=1.0 is invalid: it must be in [0, 1)'),
    ('schedule', 'linear', "config.schedule='linear' is invalid"),
    ('model.conv_impl', 'fft', "config.model.conv_impl='fft' is invalid"),
    ('grad_chunks', 3, 'config.grad_chunks=3 is invalid: it must be 0 (auto) or a divisor'),
    ('sweep.execution', 'pmap', "config.sweep.execution='pmap' is invalid"),
    ('model.dtype', 'float16', "config.model.dtype='float16' is invalid: it must be 'float32' "
                               "or 'bfloat16'"),
    ('model.kernel_sizes', (5, 3), 'config.model.kernel_sizes=(5, 3) is invalid: it must be () '
                                   '(3x3 everywhere) or one size >= 1 per conv layer'),
    ('model.kernel_sizes', (13, 9, 3), 'config.model.kernel_sizes=(13, 9, 3) is invalid'),
    ('model.conv_init', 'glorot', "config.model.conv_init='glorot' is invalid: it must be "
                                  "'he_uniform' or 'torch'"),
    ('model.dense_init', 'he', "config.model.dense_init='he' is invalid: it must be 'keras' "
                               "or 'torch'"),
    ('model.input_norm', (0.13, 0.0), 'config.model.input_norm=(0.13, 0.0) is invalid: it must '
                                      'be two numbers (mean, std) with std > 0'),
    ('model.input_norm', (0.5,), 'config.model.input_norm=(0.5,) is invalid'),
    ('model.input_norm', (float('nan'), 1.0), 'config.model.input_norm=(nan, 1.0) is invalid'),
    ('optimizer', 'rmsprop', "config.optimizer='rmsprop' is invalid: it must be 'sgd' or 'adam'"),
    ('adam_b2', 1.0, 'config.adam_b2=1.0 is invalid: it must be in [0, 1)'),
])
def test_invalid_values_name_the_field(config, field, value, message):
  configlib.set_field(config, field, value)
  with pytest.raises(UserError) as e:
    configlib.validate(config)
  assert str(e.value).startswith(message)


def test_nesterov_is_sgds(config):
  config.nesterov, config.optimizer = True, 'adam'
  with pytest.raises(UserError, match="config.nesterov=True is invalid: it must be False with "
                                      "optimizer='adam'"):
    configlib.validate(config)


def test_the_dtype_is_structure_but_not_a_checkpoints_field(config):
  # bfloat16 changes the arithmetic, not the arrays: a checkpoint restores under either dtype
  # (tests/test_train.py), while members that differ in it cannot share one program.
  from digitjax import members as members_lib
  assert 'model.dtype' not in configlib.RESUME_FIELDS + configlib.MEMBER_NUMERIC_FIELDS
  assert 'model.kernel_sizes' in configlib.MODEL_FIELDS
  config.sweep.grid = "model.dtype='float32','bfloat16'; seed=0,1"
  members = members_lib.members_of(config, '/w')
  assert [[m.name for m in g] for g in members_lib.groups_of(members)] == [
      ['model.dtype=float32,seed=0', 'model.dtype=float32,seed=1'],
      ['model.dtype=bfloat16,seed=0', 'model.dtype=bfloat16,seed=1']]


def test_a_stored_config_from_before_a_field_gets_what_was_done_then(config):
  record = config.to_dict()
  for dotted in configlib.ADDED_FIELDS:
    *parents, leaf = dotted.split('.')
    target = record
    for part in parents:
      target = target[part]
    del target[leaf]
  filled = configlib.with_added_fields(record)
  assert filled == config.to_dict()  # the defaults of configs/default.py are the old behaviour


def test_a_fraction_of_an_epoch_is_valid(config):
  config.num_epochs = 0.2
  configlib.validate(config)


def test_the_models_classes_are_the_datasets_labels(config):
  # model.num_classes went: on every supported dataset it could only be 10, the model's output.
  from digitjax import model as model_lib
  assert set(configlib.DATASET_LABELS.values()) == {model_lib.CNN.num_classes}
  assert configlib.DATASET_LABELS[config.dataset] == 10
  with pytest.raises(UserError, match=r"config.model.num_classes was removed: the classes are "
                                      r"config.dataset's"):
    configlib.set_field(config, 'model.num_classes', 10)


def test_unknown_and_removed_fields_name_the_fix(config):
  with pytest.raises(UserError, match=r"config.learnig_rate is not a config field; did you "
                                      r"mean 'learning_rate'\?"):
    configlib.set_field(config, 'learnig_rate', 0.1)
  with pytest.raises(UserError, match=r"config.ensemble_size was removed: seed ensembles are "
                                      r"populations now: --config.sweep.grid='seed=0,1,2'"):
    configlib.set_field(config, 'ensemble_size', 3)
  with pytest.raises(UserError, match='config.model is not a config field'):
    configlib.set_field(config, 'model', 3)  # a section, not a field
  with pytest.raises(UserError, match="config.batch_size=.*'big'.* has the wrong type"):
    configlib.set_field(config, 'batch_size', 'big')


def test_dotted_paths_read_config_dicts_and_plain_dicts(config):
  assert configlib.get(config, 'model.dense_features') == 100
  assert configlib.get(config.to_dict(), 'model.dense_features') == 100
  assert configlib.get(config, 'model.nope', None) is None
  with pytest.raises(KeyError):
    configlib.get(config, 'nope')


# ---------------------------------------------------------------------------------------------
# 'auto', per backend: a change here must be deliberate, so each choice is pinned.


@pytest.mark.parametrize('backend, data_devices, group, expected', [
    ('cpu', 1, 1, ('device', 'im2col', 'reshape', 'lax', 'lax', 2, 'map')),
    ('cpu', 2, 1, ('device', 'im2col', 'reshape', 'lax', 'lax', 1, 'map')),
    ('cpu', 1, 4, ('device', 'im2col', 'reshape', 'lax', 'lax', 2, 'map')),
    ('gpu', 1, 1, ('device', 'lax', 'lax', 'lax', 'lax', 1, 'map')),
    ('gpu', 8, 4, ('device', 'lax', 'lax', 'lax', 'lax', 1, 'vmap')),
    ('tpu', 4, 1, ('device', 'lax', 'lax', 'lax', 'lax', 1, 'map')),
    ('tpu', 4, 8, ('device', 'lax', 'lax', 'lax', 'lax', 1, 'vmap')),
])
def test_auto_choices_per_backend(config, backend, data_devices, group, expected):
  config.batch_size = 32
  c = configlib.resolve(config, backend=backend, data_devices=data_devices, group_size=group)
  assert (c.input_pipeline, c.conv_impl, c.pool_impl, c.eval_conv_impl, c.eval_pool_impl,
          c.grad_chunks, c.execution) == expected


def test_auto_choices_follow_the_config(config):
  config.input_pipeline = 'tfds'
  assert configlib.resolve(config, backend='cpu').conv_impl == 'mixed'  # XLA's for conv1
  config.model.batch_norm = True
  assert configlib.resolve(config, backend='cpu').grad_chunks == 1  # the whole batch
  config.model.batch_norm, config.batch_size = False, 15
  assert configlib.resolve(config, backend='cpu').grad_chunks == 1  # odd batch: one chunk
  config.grad_chunks, config.batch_size, config.model.conv_impl = 4, 32, 'winograd'
  c = configlib.resolve(config, backend='tpu')
  assert (c.grad_chunks, c.conv_impl, c.eval_conv_impl) == (4, 'winograd', 'winograd')
  config.sweep.execution = 'vmap'
  assert configlib.resolve(config, backend='cpu', group_size=3).execution == 'vmap'
  assert configlib.resolve(config, backend='cpu', group_size=1).execution == 'map'


def test_compilation_cache_follows_xdg_cache_home(config, monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert configlib.compilation_cache_dir(config) == str(tmp_path / 'digitjax' / 'jax')
  config.compilation_cache_dir = ''
  assert configlib.compilation_cache_dir(config) == ''
