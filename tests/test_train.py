"""A single run (a population of one): train, resume, reproduce, refuse what does not fit."""
import json
import os

import jax
import numpy as np
import pytest

import digitjax
from conftest import small_config
from digitjax import checkpoint as ckpt_lib, inference, loop, parallel
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def final_params(config, workdir, which='latest'):
  state, _, _ = inference.restore(config, workdir_lib.RunFiles.of(str(workdir)), which, 'eval',
                                  parallel.make_mesh())
  return jax.device_get(state.params)


def _params_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_end_to_end_then_resume_bit_exactly(idx_dir, tfds_dir, tmp_path, capsys):
  workdir = tmp_path / 'run'
  results = digitjax.train(small_config(idx_dir, tfds_dir, num_epochs=1), str(workdir))
  out = capsys.readouterr().out
  assert 'Total params: 159,254' in out and 'Epoch 1/1' in out and 'val_accuracy' in out
  # 360 training examples (400 less 10%), batches of 16 -> 22 steps per epoch.
  assert results == _results(workdir)
  assert results['num_params'] == 159_254 and results['checkpoint_step'] == 22
  assert results['test_accuracy'] > 0.5  # learnable synthetic digits, far above chance
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'metrics.jsonl', 'results.json',
                                         'tensorboard']
  assert os.listdir(workdir / 'tensorboard')

  longer = small_config(idx_dir, tfds_dir, num_epochs=2)
  resumed = digitjax.train(longer, str(workdir))
  out = capsys.readouterr().out
  assert 'Resuming from checkpoint at step 22 (epoch 2' in out
  assert 'Epoch 1/2' not in out and 'Epoch 2/2' in out
  straight = digitjax.train(longer, str(tmp_path / 'straight'))
  assert _params_equal(final_params(longer, workdir), final_params(longer, tmp_path / 'straight'))
  assert resumed['test_loss'] == straight['test_loss']
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['epoch'] for r in records if 'epoch' in r] == [1, 2]  # each epoch once
  assert ckpt_lib.Checkpoints(str(workdir / 'checkpoints')).steps() == [22, 44]
  # A finished run run again reports its results and trains nothing.
  capsys.readouterr()
  digitjax.train(longer, str(workdir))
  out = capsys.readouterr().out
  assert 'Already trained to step 44' in out and 'Epoch' not in out and 'Resuming' not in out


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_other_numbers(idx_dir, tfds_dir, tmp_path):
  runs = {name: small_config(idx_dir, tfds_dir, **over)
          for name, over in (('a', {}), ('b', {}), ('c', {'seed': 1}))}
  results = {name: digitjax.train(c, str(tmp_path / name)) for name, c in runs.items()}
  params = {name: final_params(c, tmp_path / name) for name, c in runs.items()}
  assert _params_equal(params['a'], params['b'])
  assert results['a']['test_loss'] == results['b']['test_loss']
  assert not _params_equal(params['a'], params['c'])


def test_non_finite_loss_stops_with_a_clear_error(idx_dir, tfds_dir, tmp_path):
  config = small_config(idx_dir, tfds_dir, learning_rate=1e6)
  with pytest.raises(loop.NonFiniteLossError, match='non-finite at step'):
    digitjax.train(config, str(tmp_path / 'nan'))
  assert not os.path.exists(tmp_path / 'nan' / 'results.json')


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_a_one_line_error(idx_dir, tfds_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  digitjax.train(small_config(idx_dir, tfds_dir), workdir)
  wider = small_config(idx_dir, tfds_dir, num_epochs=2, **{'model.dense_features': 128})
  with pytest.raises(UserError) as e:
    digitjax.train(wider, workdir)
  assert 'model.dense_features=100 in the checkpoint but 128 in the config' in str(e.value)
  assert '\n' not in str(e.value)
  assert ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints')).steps() == [22]


@pytest.mark.slow
def test_real_mnist_subset_reaches_95_percent(mnist_dir, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds_mnist')
  config = small_config(mnist_dir, data_dir, batch_size=32, learning_rate=0.01,
                        eval_batch_size=1000, **{'data.verify_checksums': True,
                                                 'data.max_train_examples': 12000})
  workdir = tmp_path_factory.mktemp('mnist_run')
  results = digitjax.train(config, str(workdir))
  assert results['val_accuracy'] >= 0.95, results


@pytest.mark.slow
def test_fractional_epochs_end_with_a_partial_epoch(idx_dir, tfds_dir, tmp_path, capsys):
  results = digitjax.train(small_config(idx_dir, tfds_dir, num_epochs=1.5),
                           str(tmp_path / 'run'))
  out = capsys.readouterr().out
  assert 'Epoch 1/2' in out and 'Epoch 2/2' in out
  assert results['epochs_completed'] == 1.5 and results['checkpoint_step'] == 33  # 22 x 1.5
  fifth = digitjax.train(small_config(idx_dir, tfds_dir, num_epochs=0.2), str(tmp_path / 'fifth'))
  assert fifth['checkpoint_step'] == 4  # round(22 x 0.2): a smoke test of a fifth of an epoch


def test_best_checkpoint_is_kept_beside_the_latest(tmp_path):
  # Real orbax checkpoints: the latest `keep` stay, and the best by validation accuracy stays
  # too when it is older than all of them; mid-epoch ones (no metric) never count as best.
  state = {'w': np.arange(3, dtype=np.float32)}
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints'), keep=3)
  accuracy = {1: 0.90, 2: 0.97, 3: 0.50, 4: None, 5: 0.70, 6: 0.80}
  for step, acc in accuracy.items():
    checkpoints.save(step, state, {'step': step},
                     None if acc is None else {'val_accuracy': acc})
    checkpoints.wait()
  assert checkpoints.steps() == [2, 4, 5, 6]
  assert checkpoints.best_step() == 2
  checkpoints.close()
  reopened = ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints'), read_only=True)
  assert reopened.best_step() == 2 and reopened.steps() == [2, 4, 5, 6]  # across restarts
  reopened.close()


@pytest.mark.slow
def test_a_float32_checkpoint_resumes_and_restores_under_bfloat16(idx_dir, tfds_dir, tmp_path,
                                                                   capsys):
  # The state holds parameters and optimizer state, float32 under either model.dtype: the
  # same checkpoint serves both, and a bfloat16 run continues a float32 one.
  workdir = str(tmp_path / 'run')
  digitjax.train(small_config(idx_dir, tfds_dir, num_epochs=0.2), workdir)
  saved = final_params(small_config(idx_dir, tfds_dir, num_epochs=0.2), workdir)
  bf16 = small_config(idx_dir, tfds_dir, num_epochs=0.4, **{'model.dtype': 'bfloat16'})
  restored = final_params(bf16, workdir)
  assert _params_equal(restored, saved)
  assert {x.dtype for x in jax.tree.leaves(restored)} == {np.dtype('float32')}
  results = digitjax.train(bf16, workdir)
  assert 'Resuming from checkpoint at step 4' in capsys.readouterr().out
  assert results['checkpoint_step'] == 9 and results['config']['model']['dtype'] == 'bfloat16'
  state, _, _ = inference.restore(bf16, workdir_lib.RunFiles.of(workdir), 'latest', 'eval',
                                  parallel.make_mesh())
  assert {x.dtype for x in jax.tree.leaves(state.opt_state)} <= {np.dtype('float32'),
                                                                np.dtype('int32')}
