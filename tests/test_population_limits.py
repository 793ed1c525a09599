"""A population's size: its cost (memory, disk, open files) estimated from the config and refused
in one line before any work when this machine cannot hold it (config.sweep.allow_large goes
ahead anyway); and signals honoured while its members are set up, between two members."""
import math
import os
import shutil
import signal

import jax
import pytest

import digitjax
from conftest import small_config
from digitjax import checkpoint as ckpt_lib, members as members_lib, plan, signals, steps
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError


def _seeds(n: int) -> str:
  return 'seed=' + ','.join(map(str, range(n)))


def _refusal(config, workdir) -> str:
  with pytest.raises(UserError) as e:
    digitjax.train(config, str(workdir))
  message = str(e.value)
  assert '\n' not in message
  return message


def _huge_members(idx_dir, tfds_dir, tmp_path, **over):
  """Members of 0.8 GB each (a 100,000-wide dense layer and its momentum), as many as it takes
  to exceed this machine's memory; the data's folder does not exist, so that any error after
  the size check is about the data."""
  n = math.ceil(plan.machine()['memory'] / 1.2e9) + 2
  return small_config(idx_dir, tfds_dir, checkpoint_keep=1, **{
      'model.dense_features': 100_000, 'sweep.grid': _seeds(n), 'sweep.select': 'ensemble',
      'data.manual_dir': str(tmp_path / 'no-data-here'), 'data.data_dir': str(tmp_path / 'tfds'),
      **over})


def test_a_population_beyond_the_machines_memory_is_refused_before_any_work(
    idx_dir, tfds_dir, tmp_path):
  config = _huge_members(idx_dir, tfds_dir, tmp_path)
  workdir = tmp_path / 'run'
  message = _refusal(config, workdir)
  assert 'members, which would need about' in message and 'of memory' in message
  assert 'config.sweep.allow_large=True' in message
  assert not workdir.exists() and not (tmp_path / 'tfds').exists()  # no folder, no data


def test_allow_large_goes_ahead(idx_dir, tfds_dir, tmp_path):
  config = _huge_members(idx_dir, tfds_dir, tmp_path, **{'sweep.allow_large': True})
  message = _refusal(config, tmp_path / 'run')
  assert 'would need' not in message and 'no-data-here' in message  # it went on to the data


def test_the_issues_90000_member_grid_is_refused_at_once(config, tmp_path):
  config.data.max_train_examples = 2000
  config.sweep.grid = (_seeds(300) + '; learning_rate=' +
                       ','.join(f'{0.001 * (i + 1):.3f}' for i in range(300)))
  message = _refusal(config, tmp_path / 'run')
  assert message.startswith('config.sweep declares 90,000 members, which would need about')
  assert not (tmp_path / 'run').exists()


def test_checkpoints_beyond_the_free_disk_are_refused(config, tmp_path):
  state = plan._state_bytes(config, {})
  free = shutil.disk_usage(tmp_path).free
  # Two members' checkpoints would need twice the free disk: files other tests delete meanwhile
  # (the suite runs on two workers) cannot make room for them.
  config.checkpoint_keep = free // state + 10
  config.sweep.grid = _seeds(2)
  message = _refusal(config, tmp_path / 'run')
  assert 'of disk for checkpoints' in message and f'under {tmp_path}' in message
  assert 'of memory' not in message and not (tmp_path / 'run').exists()


def test_the_estimate_counts_each_structures_states(config):
  config.sweep.grid = _seeds(3)
  config.sweep.members = ('', 'model.dense_features=50')
  state, _, _ = steps.create(config, jax.random.key(0))
  narrow, _, _ = steps.create(small_config(config.data.manual_dir, config.data.data_dir,
                                           **{'model.dense_features': 50}), jax.random.key(0))
  size = lambda s: sum(x.nbytes for x in jax.tree.leaves(s))
  cost = plan.estimate_cost(config, members_lib.override_sets(config))
  assert (cost.members, cost.largest_group) == (6, 3)
  assert cost.disk == 3 * (size(state) + size(narrow)) * (config.checkpoint_keep + 2)
  logits = (6000 + 10000) * 10 * 4  # the validation and test logits of all 60,000 examples
  assert cost.memory == (plan.RUNTIME_BYTES + 6 * (logits + plan.MEMBER_BYTES)
                         + plan.STATE_COPIES * 3 * size(state))


# ---------------------------------------------------------------------------------------------
# Signals while the members are set up


def _sigterm_at(count: int):
  """A callable that sends this process a real SIGTERM on its `count`-th call."""
  calls = []

  def maybe():
    calls.append(1)
    if len(calls) == count:
      os.kill(os.getpid(), signal.SIGTERM)
  return maybe


def test_sigterm_while_making_member_folders_stops_between_two_members(
    config, tmp_path, monkeypatch):
  config.sweep.grid = _seeds(4)
  workdir = tmp_path / 'run'
  write, signal_now = workdir_lib.write_json_atomic, _sigterm_at(2)

  def spy(path, obj):
    write(path, obj)
    if os.sep + 'members' + os.sep in path and path.endswith('config.json'):
      signal_now()
  monkeypatch.setattr(workdir_lib, 'write_json_atomic', spy)
  with pytest.raises(signals.Interrupted) as e:
    digitjax.train(config, str(workdir))
  assert e.value.exit_status == 143 and "making the members' folders" in str(e.value)
  assert sorted(os.listdir(workdir / 'members')) == ['00-seed=0', '01-seed=1']


def test_sigterm_while_opening_checkpoints_stops_between_two_members(
    config, tmp_path, monkeypatch):
  config.sweep.grid = _seeds(4)
  workdir = tmp_path / 'run'
  signal_now = _sigterm_at(2)

  class Spy(ckpt_lib.Checkpoints):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      signal_now()
  monkeypatch.setattr(ckpt_lib, 'Checkpoints', Spy)
  with pytest.raises(signals.Interrupted) as e:
    digitjax.train(config, str(workdir))
  assert e.value.exit_status == 143 and 'checkpoints' in str(e.value)
  opened = sorted(m for m in os.listdir(workdir / 'members')
                  if (workdir / 'members' / m / 'checkpoints').exists())
  assert opened == ['00-seed=0', '01-seed=1']
