import json
import os

import jax
import numpy as np
import pytest

from conftest import MNIST_DIR, requires_mnist, small_config
from digitjax import checkpoint as ckpt_lib, train
from digitjax.errors import UserError


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def _params_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_and_evaluate_end_to_end(config, tmp_path, capsys):
  config.num_epochs = 2
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'Total params: 159,254' in out
  assert 'Epoch 1/2' in out and 'Epoch 2/2' in out and 'val_accuracy' in out
  results = _results(workdir)
  assert results['num_params'] == 159_254 and results['epochs_completed'] == 2
  # 360 training examples (400 less 10%), batches of 16 -> 22 steps per epoch.
  assert results['checkpoint_step'] == 44 == int(state.step)
  assert results['test_accuracy'] > 0.5  # learnable synthetic digits, far above chance
  for key in ('test_loss', 'val_accuracy', 'train_seconds', 'compile_seconds', 'config'):
    assert key in results
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [l['epoch'] for l in lines if 'epoch' in l] == [1, 2]
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints')).steps() == [22, 44]


def test_resume_continues_where_the_last_run_stopped(idx_dir, tfds_dir, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(small_config(idx_dir, tfds_dir, num_epochs=1), workdir)
  capsys.readouterr()
  resumed = train.train_and_evaluate(small_config(idx_dir, tfds_dir, num_epochs=2), workdir)
  out = capsys.readouterr().out
  assert 'Resuming from checkpoint at step 22 (epoch 2' in out
  assert 'Epoch 1/2' not in out and 'Epoch 2/2' in out
  straight = train.train_and_evaluate(small_config(idx_dir, tfds_dir, num_epochs=2),
                                      str(tmp_path / 'straight'))
  assert _params_equal(resumed.params, straight.params)  # same order, same optimizer state
  # A finished run re-run reports its results and trains nothing.
  capsys.readouterr()
  train.train_and_evaluate(small_config(idx_dir, tfds_dir, num_epochs=2), workdir)
  out = capsys.readouterr().out
  assert 'Already trained to step 44' in out and 'Epoch' not in out and 'Resuming' not in out


def test_same_seed_same_numbers_other_seed_other_numbers(idx_dir, tfds_dir, tmp_path):
  a = train.train_and_evaluate(small_config(idx_dir, tfds_dir), str(tmp_path / 'a'))
  b = train.train_and_evaluate(small_config(idx_dir, tfds_dir), str(tmp_path / 'b'))
  c = train.train_and_evaluate(small_config(idx_dir, tfds_dir, seed=1), str(tmp_path / 'c'))
  assert _params_equal(a.params, b.params)
  assert _results(tmp_path / 'a')['test_loss'] == _results(tmp_path / 'b')['test_loss']
  assert not _params_equal(a.params, c.params)


def test_non_finite_loss_stops_with_a_clear_error(idx_dir, tfds_dir, tmp_path):
  config = small_config(idx_dir, tfds_dir, learning_rate=1e6)
  with pytest.raises(train.NonFiniteLossError, match='non-finite at step'):
    train.train_and_evaluate(config, str(tmp_path / 'nan'))
  assert not os.path.exists(tmp_path / 'nan' / 'results.json')


def test_checkpoint_of_another_architecture_is_a_one_line_error(idx_dir, tfds_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(small_config(idx_dir, tfds_dir), workdir)
  wider = small_config(idx_dir, tfds_dir, num_epochs=2, **{'model.dense_features': 128})
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(wider, workdir)
  assert 'model.dense_features=100 in the checkpoint but 128 in the config' in str(e.value)
  assert '\n' not in str(e.value)
  assert ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints')).steps() == [22]


@requires_mnist
def test_real_mnist_subset_reaches_95_percent(tfds_dir, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds_mnist')
  config = small_config(MNIST_DIR, data_dir, batch_size=32, learning_rate=0.01,
                        eval_batch_size=1000, **{'data.verify_checksums': True,
                                                 'data.max_train_examples': 12000})
  workdir = tmp_path_factory.mktemp('mnist_run')
  train.train_and_evaluate(config, str(workdir))
  results = _results(workdir)
  assert results['val_accuracy'] >= 0.95, results


def test_fractional_epochs_end_with_a_partial_epoch(idx_dir, tfds_dir, tmp_path, capsys):
  config = small_config(idx_dir, tfds_dir, num_epochs=1.5)
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  out = capsys.readouterr().out
  assert int(state.step) == 33  # 22 steps per epoch x 1.5
  assert 'Epoch 1/2' in out and 'Epoch 2/2' in out
  results = _results(tmp_path / 'run')
  assert results['epochs_completed'] == 1.5 and results['checkpoint_step'] == 33
