"""Configs that cannot work are one line naming the field, whoever made them: a damaged stored
config (it names the file), a field out of its range, the Python API given the wrong arguments,
a half-set multi-host environment. And the installed version is the package's."""
import importlib.metadata
import json
import math

import pytest

from conftest import small_config
from digitjax import configlib, parallel, stored_config
from digitjax.errors import UserError


def _one_line(error) -> str:
  text = str(error)
  assert '\n' not in text, text
  return text


# ---------------------------------------------------------------------------------------------
# Finding 8: a damaged stored config names its file and field


def _damage(record: dict, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  for part in parents:
    record = record[part]
  if value is _DELETE:
    del record[leaf]
  else:
    record[leaf] = value


_DELETE = object()


def _stored(tmp_path, monkeypatch, config, file='results.json'):
  """Loads the config launch.py would take from a workdir holding `config` in `file`."""
  (tmp_path / file).write_text(json.dumps({'config': config}))
  loaded = stored_config.get_config(str(tmp_path))  # as launch.py passes --workdir
  configlib.validate(loaded)  # as every mode and train do first
  return loaded


@pytest.mark.parametrize('field, value, says', [
    ('batch_size', '32', "config field batch_size is '32' (a str), expected an int"),
    ('model.conv_features', 'abc',
     "config field model.conv_features is 'abc' (a str), expected a tuple"),
    ('model.conv_features', [32, 'x'],
     "config field model.conv_features is (32, 'x'), expected a tuple of int"),
    ('model', _DELETE, 'config field model is missing'),
    ('num_epochs', None, 'config field num_epochs is None, expected a float'),
    ('distributed', _DELETE, 'config field distributed is missing'),
    ('plots', 'yes', "config field plots is 'yes' (a str), expected a bool"),
    ('batch_size', -5, 'config.batch_size=-5 is invalid: it must be a positive integer'),
])
def test_a_damaged_stored_config_names_the_file_and_field(config, tmp_path, monkeypatch,
                                                          field, value, says):
  record = json.loads(json.dumps(config.to_dict()))  # as results.json holds it
  _damage(record, field, value)
  with pytest.raises(UserError) as e:
    _stored(tmp_path, monkeypatch, record)
  text = _one_line(e.value)
  assert text.startswith(f'{tmp_path}/results.json: '), text
  assert says in text
  assert 'the file is damaged' in text and '--config=configs/' in text


def test_a_population_config_json_and_a_non_object_config_are_named_too(config, tmp_path,
                                                                        monkeypatch):
  record = json.loads(json.dumps(config.to_dict()))
  record['model']['dense_features'] = 1.5
  with pytest.raises(UserError, match=r'/config\.json: config field model\.dense_features is '
                                      r'1\.5 \(a float\), expected an int'):
    _stored(tmp_path, monkeypatch, record, file='config.json')
  (tmp_path / 'config.json').unlink()
  with pytest.raises(UserError, match=r"/results\.json: its 'config' is 'abc' \(a str\), not "
                                      r"an object"):
    _stored(tmp_path, monkeypatch, 'abc')


def test_an_intact_stored_config_loads_as_it_was(config, tmp_path, monkeypatch):
  config.num_epochs = 2  # an int where the field holds floats: JSON keeps 2.0 as 2.0 anyway
  record = json.loads(json.dumps(config.to_dict()))
  record['num_epochs'] = 2  # as a hand-edited file may say
  loaded = _stored(tmp_path, monkeypatch, record)
  assert loaded.to_dict() == config.to_dict()


# ---------------------------------------------------------------------------------------------
# Findings 9 and 10: every field checked, in one line naming the field and what it may be


@pytest.mark.parametrize('field, value, message', [
    ('plateau.factor', 2.0, "config.plateau.factor=2.0 is invalid: it must be in (0, 1)"),
    ('plateau.factor', 0.0, "config.plateau.factor=0.0 is invalid: it must be in (0, 1)"),
    ('plateau.factor', math.nan, "config.plateau.factor=nan is invalid: it must be in (0, 1)"),
    ('plateau.patience', -1, 'config.plateau.patience=-1 is invalid: it must be an integer >= 0'),
    ('plateau.cooldown', -3, 'config.plateau.cooldown=-3 is invalid: it must be an integer >= 0'),
    ('distributed.mode', 'bogus',
     "config.distributed.mode='bogus' is invalid: it must be 'auto', 'on' or 'off'"),
    ('distributed.cpu_collectives', 'bogus',
     "config.distributed.cpu_collectives='bogus' is invalid: it must be 'gloo', 'mpi', "
     "'megascale' or '' (JAX's default)"),
    ('distributed.num_processes', -1, 'config.distributed.num_processes=-1 is invalid'),
    ('distributed.process_id', -2, 'config.distributed.process_id=-2 is invalid'),
    ('distributed.initialization_timeout', 0,
     'config.distributed.initialization_timeout=0 is invalid'),
])
def test_every_field_is_checked(config, field, value, message):
  configlib.set_field(config, field, value)
  with pytest.raises(UserError) as e:
    configlib.validate(config)
  assert _one_line(e.value).startswith(message)


def test_a_wrong_type_or_a_missing_section_is_a_line_not_a_traceback(config):
  bad = config.to_dict()
  bad['batch_size'] = '32'
  import ml_collections
  with pytest.raises(UserError, match=r"config.batch_size='32' is invalid: it must be a "
                                      r"positive integer"):
    configlib.validate(ml_collections.ConfigDict(bad))
  del bad['model']
  bad['batch_size'] = 32
  with pytest.raises(UserError, match=r'config.model is missing; every config has it'):
    configlib.validate(ml_collections.ConfigDict(bad))


@pytest.mark.parametrize('field, value', [('distributed.mode', 'bogus'),
                                          ('distributed.cpu_collectives', 'bogus')])
def test_launch_joins_no_cluster_on_a_bad_distributed_field(config, field, value):
  # launch.py starts the distributed runtime before it validates the rest of the config.
  configlib.set_field(config, field, value)
  config.distributed.mode = config.distributed.mode if field == 'distributed.mode' else 'on'
  with pytest.raises(UserError) as e:
    parallel.initialize_distributed(config.distributed)
  assert _one_line(e.value).startswith(f'config.{field}={value!r} is invalid')


def test_the_distributed_choices_agree():
  assert parallel.DISTRIBUTED_MODES == configlib.DISTRIBUTED_MODES
  assert parallel.CPU_COLLECTIVES == configlib.CPU_COLLECTIVES


# ---------------------------------------------------------------------------------------------
# Finding 12: the Python API's arguments


@pytest.mark.parametrize('bad, says', [
    ({'batch_size': 32}, "digitjax.train: config is a dict; give an ml_collections.ConfigDict"),
    (None, 'digitjax.train: config is None; give an ml_collections.ConfigDict'),
])
def test_train_refuses_a_config_that_is_not_one(tmp_path, bad, says):
  import digitjax
  with pytest.raises(UserError) as e:
    digitjax.train(bad, str(tmp_path / 'w'))
  assert _one_line(e.value).startswith(says)
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('bad, says', [
    (123, 'digitjax.train: workdir is 123 (an int); give a folder path (a str or a pathlib.Path)'),
    ('  ', "digitjax.train: workdir is '  '"),
])
def test_train_refuses_a_workdir_that_is_not_a_path(config, tmp_path, monkeypatch, bad, says):
  import digitjax
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError) as e:
    digitjax.train(config, bad)
  assert _one_line(e.value).startswith(says)
  assert list(tmp_path.iterdir()) == []


def test_train_takes_a_path_object(config, tmp_path):
  import digitjax
  config.batch_size = -1  # refused by validation: the path itself got through
  with pytest.raises(UserError, match='config.batch_size=-1 is invalid'):
    digitjax.train(config, tmp_path / 'w')


# ---------------------------------------------------------------------------------------------
# Finding 15: one version


def test_the_installed_version_is_the_packages():
  import digitjax
  assert importlib.metadata.version('digitjax') == digitjax.__version__


# ---------------------------------------------------------------------------------------------
# Distributed auto-detection: a half-set or nonsensical environment is refused in one line,
# before JAX is asked to join anything (a bad one would wait for peers, or raise a traceback).

CLUSTER_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'SLURM_STEP_NODELIST',
                     'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID', 'OMPI_COMM_WORLD_SIZE',
                     'OMPI_MCA_orte_hnp_uri', 'TPU_WORKER_HOSTNAMES',
                     'MEGASCALE_COORDINATOR_ADDRESS')


@pytest.fixture
def no_cluster(monkeypatch):
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


@pytest.mark.parametrize('environment, fields, says', [
    ({'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1234'}, {},
     'JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 is set but not the number of processes'),
    ({'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1234'}, {'num_processes': 2},
     'JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 is set but not this process\'s id'),
    ({'JAX_COORDINATOR_ADDRESS': 'nonsense'}, {'num_processes': 2, 'process_id': 0},
     "JAX_COORDINATOR_ADDRESS='nonsense' is not host:port"),
    ({}, {'coordinator_address': '127.0.0.1:99999', 'num_processes': 2, 'process_id': 0},
     "config.distributed.coordinator_address='127.0.0.1:99999' is not host:port"),
    ({}, {'coordinator_address': '127.0.0.1:1234', 'num_processes': 2, 'process_id': 2},
     'config.distributed.process_id=2 is not below config.distributed.num_processes=2'),
    ({'SLURM_JOB_ID': '77'}, {},
     'SLURM_JOB_ID is set but not SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, '
     'SLURM_LOCALID'),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, {}, 'OMPI_COMM_WORLD_SIZE is set but not '
                                        'OMPI_MCA_orte_hnp_uri'),
])
def test_auto_detection_refuses_a_bad_environment_clearly(config, no_cluster, environment,
                                                          fields, says):
  for name, value in environment.items():
    no_cluster.setenv(name, value)
  for name, value in fields.items():
    config.distributed[name] = value
  with pytest.raises(UserError) as e:
    parallel.initialize_distributed(config.distributed)
  text = _one_line(e.value)
  assert says in text, text
  assert "config.distributed.mode='off'" in text  # the way out: run as one process


def test_on_without_any_cluster_is_refused(config, no_cluster):
  config.distributed.mode = 'on'
  with pytest.raises(UserError, match=r"config.distributed.mode='on' but no coordinator"):
    parallel.initialize_distributed(config.distributed)


def test_auto_without_a_cluster_runs_alone(config, no_cluster):
  parallel.initialize_distributed(config.distributed)  # nothing to join: returns at once


def test_a_stored_config_from_before_the_added_fields_loads(config, tmp_path, monkeypatch):
  record = json.loads(json.dumps(config.to_dict()))
  for dotted in configlib.ADDED_FIELDS:
    _damage(record, dotted, _DELETE)
  loaded = _stored(tmp_path, monkeypatch, record)  # not 'damaged': what was done then
  assert loaded.to_dict() == config.to_dict()


def test_a_stored_config_from_before_a_field_was_removed_loads_without_it(config, tmp_path,
                                                                          monkeypatch):
  from digitjax import checkpoint as ckpt_lib
  record = json.loads(json.dumps(config.to_dict()))
  record['model']['num_classes'] = 10  # what every workdir trained before its removal holds
  loaded = _stored(tmp_path, monkeypatch, record)
  assert loaded.to_dict() == config.to_dict()
  # Its checkpoints recorded the field among the ones a resume must share: they still fit.
  saved = {**ckpt_lib.resume_fields(record), 'model.num_classes': 10}
  ckpt_lib.check_compatible({'resume_fields': saved}, loaded.to_dict(), 'the old checkpoint')
  with pytest.raises(ckpt_lib.CheckpointMismatch, match='batch_size=64 in the checkpoint'):
    ckpt_lib.check_compatible({'resume_fields': {**saved, 'batch_size': 64}}, loaded.to_dict(),
                              'the old checkpoint')


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_launch_names_the_damaged_file_in_its_error_line(config, tmp_path, processes, mode):
  from conftest import ROOT, launch_args
  record = json.loads(json.dumps(config.to_dict()))
  record['batch_size'] = '32'
  (tmp_path / 'results.json').write_text(json.dumps({'config': record}))
  proc = processes.run(launch_args(f'--workdir={tmp_path}', f'--mode={mode}'), cwd=ROOT)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}/results.json: config field batch_size is '32' (a str), expected an "
      f"int; the file is damaged: restore it, or give the config the run was trained with "
      f"(--config=configs/<name>.py)")
