"""Seed ensembles: members trained at once by vmap, each the model its seed trains alone."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import small_config
from digitjax import checkpoint as ckpt_lib, ensemble, evaluate, metrics, train
from digitjax.errors import UserError

K = 2


def _config(idx_dir, tfds_dir, **overrides):
  """Augmentation on, so each member's PRNG key is exercised as well as its init and order."""
  return small_config(idx_dir, tfds_dir, **{'augment.enabled': True, **overrides})


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope='module')
def one_epoch(idx_dir, tfds_dir, tmp_path_factory):
  """(config, workdir, state) of a K=2 ensemble trained for one epoch (22 steps)."""
  config = _config(idx_dir, tfds_dir, ensemble_size=K)
  workdir = str(tmp_path_factory.mktemp('ensemble'))
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_each_member_is_the_model_its_seed_trains_alone(one_epoch, idx_dir, tfds_dir, tmp_path):
  config, _, state = one_epoch
  assert np.asarray(state.step).tolist() == [22] * K
  for i in range(K):
    # The same layers and input path as the vmapped members (im2col convolutions inside
    # lax.scan, whole-batch gradients), so only vmap's rounding differs. Across formulations
    # (e.g. the tfds path's 'mixed' convolutions) a near-tie in a pooling window can flip within
    # a few steps and move the parameters by ~1e-3 after an epoch: both are the same mathematics.
    alone = _config(idx_dir, tfds_dir, seed=config.seed + i, input_pipeline='device',
                    grad_chunks=1, **{'data.split_seed': config.seed})
    single = train.train_and_evaluate(alone, str(tmp_path / f'seed{i}'))
    member = ensemble.member(state, i)
    for a, b in zip(jax.tree.leaves(member.params), jax.tree.leaves(single.params)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(member.rng, single.rng)
  assert not _leaves_equal(ensemble.member(state.params, 0), ensemble.member(state.params, 1))


def test_results_hold_the_ensemble_and_its_members(one_epoch, tmp_path):
  config, workdir, _ = one_epoch
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  members = results['member_test_accuracy']
  assert len(members) == len(results['member_test_loss']) == K
  assert all(0 <= a <= 1 for a in members) and 0 <= results['test_accuracy'] <= 1
  assert results['member_test_accuracy_mean'] == pytest.approx(np.mean(members))
  assert results['member_test_accuracy_std'] == pytest.approx(np.std(members, ddof=1))
  # The loss of the mean probabilities is at most the members' mean loss (log is concave).
  assert results['test_loss'] <= np.mean(results['member_test_loss']) + 1e-9
  assert results['num_params'] == 159_254  # of one member
  assert len(metrics.read_history(workdir)[-1]['member_val_accuracy']) == K
  # --mode=eval restores the stack and reproduces the numbers; predict averages the members.
  result = evaluate.run_eval(config, workdir, 'latest', 'test')
  assert result['test_accuracy'] == results['test_accuracy']
  assert result['member_test_accuracy'] == members
  images = np.zeros((3, 28, 28), np.uint8)
  images[:, 8:14, 12:18] = 255
  np.save(tmp_path / 'digits.npy', images)
  output = tmp_path / 'predictions.csv'
  assert evaluate.run_predict(config, workdir, [str(tmp_path / 'digits.npy')], str(output)) == 0
  assert len(output.read_text().splitlines()) == 4


def test_resumed_ensemble_equals_an_uninterrupted_one(one_epoch, idx_dir, tfds_dir, tmp_path,
                                                      capsys):
  _, workdir, _ = one_epoch
  resumed_dir = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed_dir)
  two_epochs = lambda k=K: _config(idx_dir, tfds_dir, ensemble_size=k, num_epochs=2)
  capsys.readouterr()
  resumed = train.train_and_evaluate(two_epochs(), resumed_dir)
  out = capsys.readouterr().out
  assert 'Resuming from checkpoint at step 22 (epoch 2' in out and 'Epoch 1/2' not in out
  straight = train.train_and_evaluate(two_epochs(), str(tmp_path / 'straight'))
  assert np.asarray(resumed.step).tolist() == [44] * K
  assert _leaves_equal(resumed.params, straight.params)
  assert _leaves_equal(resumed.opt_state, straight.opt_state)
  with pytest.raises(ckpt_lib.CheckpointMismatch,
                     match='ensemble_size=2 in the checkpoint but 3 in the config'):
    train.train_and_evaluate(two_epochs(3), resumed_dir)


def test_ensembles_need_the_device_input(idx_dir, tfds_dir, tmp_path):
  config = _config(idx_dir, tfds_dir, ensemble_size=K, input_pipeline='tfds')
  with pytest.raises(UserError, match=r"input_pipeline='tfds' is invalid: .*ensemble_size > 1"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  with pytest.raises(UserError, match='ensemble_size=0 is invalid'):
    train.train_and_evaluate(_config(idx_dir, tfds_dir, ensemble_size=0), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')  # refused before anything was written


def test_non_finite_check_takes_the_first_bad_step_of_any_member():
  never = np.iinfo(np.int32).max
  sums = {'loss': np.float32([2.0, 4.0]), 'accuracy': np.float32([1.0, 0.5]),
          'steps': np.int32([2, 2]), 'first_nonfinite_step': np.int32([never, 7])}
  assert train._read_sums(sums) == {'loss': 1.5, 'accuracy': 0.375, 'first_nonfinite_step': 7}


def test_combined_logits_are_the_log_of_the_mean_probabilities():
  logits = np.random.default_rng(0).normal(size=(3, 5, 10)).astype(np.float32) * 4
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.exp(ensemble.combine_logits(logits)), probabilities.mean(0),
                             rtol=1e-6)
  single = logits[0]
  assert ensemble.combine_logits(single) is single  # a single model's logits pass unchanged
