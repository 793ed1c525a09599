"""Ensembles of variants: a vmapped seed ensemble per variant, every member averaged."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, small_config, synthetic_digits
from digitjax import evaluate, variants
from digitjax.errors import UserError

VARIANTS = ('', 'model.batch_norm=True; augment.enabled=True')


def _config(idx_dir, tfds_dir, **overrides):
  return small_config(idx_dir, tfds_dir, **{'ensemble_size': 2, 'ensemble_variants': VARIANTS,
                                            **overrides})


def _json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def trained(idx_dir, tfds_dir, tmp_path_factory):
  config = _config(idx_dir, tfds_dir)
  workdir = str(tmp_path_factory.mktemp('variants'))
  return config, workdir, variants.train_and_evaluate(config, workdir)


def test_each_variant_is_a_run_of_its_own_and_all_members_are_averaged(trained, capsys):
  config, workdir, states = trained
  plain, normed = states
  assert plain.batch_stats is None and len(jax.tree.leaves(normed.batch_stats)) == 8
  results = _json(os.path.join(workdir, 'results.json'))
  parts = [_json(os.path.join(workdir, f'variant{i}', 'results.json')) for i in (0, 1)]
  assert parts[1]['config']['model']['batch_norm'] and parts[1]['config']['augment']['enabled']
  assert not parts[0]['config']['model']['batch_norm']
  # The members are the variants' members, variant by variant, with the figures each variant's
  # own run computed; the average's loss is at most their mean loss (log is concave).
  members = parts[0]['member_test_accuracy'] + parts[1]['member_test_accuracy']
  assert results['member_test_accuracy'] == members and len(members) == 4
  assert results['member_test_loss'] == pytest.approx(
      parts[0]['member_test_loss'] + parts[1]['member_test_loss'], rel=1e-6)
  assert results['test_loss'] <= np.mean(results['member_test_loss']) + 1e-9
  assert [v['overrides'] for v in results['variants']] == list(VARIANTS)
  assert [v['test_accuracy'] for v in results['variants']] == [p['test_accuracy'] for p in parts]
  assert results['train_seconds'] == pytest.approx(sum(p['train_seconds'] for p in parts))
  # The same combination from the checkpoints: --mode=eval restores every variant.
  result = evaluate.run('eval', config, workdir, 'latest', 'test')
  assert result == 0
  assert _json(os.path.join(workdir, 'eval.json'))['test_loss'] == results['test_loss']
  # Run again: every variant has finished, nothing trains, the same figures come back.
  capsys.readouterr()
  again = variants.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert out.count('Already trained to step 22') == 2 and 'Epoch' not in out
  assert _json(os.path.join(workdir, 'results.json'))['test_loss'] == results['test_loss']
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(states)))


def test_a_variant_resumes_as_its_own_run(trained, idx_dir, tfds_dir, tmp_path, capsys):
  _, workdir, _ = trained
  longer = _config(idx_dir, tfds_dir, num_epochs=2)
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  capsys.readouterr()
  resumed_states = variants.train_and_evaluate(longer, resumed)
  out = capsys.readouterr().out
  assert out.count('Resuming from checkpoint at step 22 (epoch 2') == 2
  straight = variants.train_and_evaluate(longer, str(tmp_path / 'straight'))
  for a, b in zip(jax.tree.leaves(resumed_states), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('bad,message', [
    (('', 'model.batch_nrom=True'), "sets model.batch_nrom, which is not a config field"),
    (('', 'model.batch_norm=maybe'), "sets model.batch_norm to 'maybe', a value of another type"),
    (('', 'seed=3'), 'sets seed, which all variants share'),
    (('', 'data.max_train_examples=100'), 'sets data.max_train_examples, which all variants share'),
    (('', 'batch_norm'), "is not a list of field=value separated by ';'"),
    (('', 'learning_rate=-1.0'), 'config.learning_rate=-1.0 is invalid'),
    (('model.batch_norm=True',), 'two or more strings of overrides'),
])
def test_bad_variants_are_one_line_errors_before_any_work(idx_dir, tfds_dir, tmp_path, bad,
                                                          message):
  config = _config(idx_dir, tfds_dir, ensemble_variants=bad)
  with pytest.raises(UserError, match=message) as e:
    variants.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'run')


def test_launch_trains_variants_predicts_with_all_and_points_report_at_one(trained, idx_dir,
                                                                          tfds_dir, tmp_path):
  _, workdir, _ = trained
  # The fixture's run, as launch.py runs it: trained already, it is only evaluated again.
  base = [sys.executable, str(ROOT / 'launch.py'), '--config=configs/default.py',
          f'--workdir={workdir}', f'--config.data.manual_dir={idx_dir}',
          f'--config.data.data_dir={tfds_dir}', '--config.data.verify_checksums=False',
          '--config.batch_size=16', '--config.eval_batch_size=50', '--config.num_epochs=1',
          '--config.learning_rate=0.02', '--config.ensemble_size=2', '--config.plots=False',
          '--config.compilation_cache_dir=',
          f"--config.ensemble_variants={VARIANTS!r}"]
  before = _json(os.path.join(workdir, 'results.json'))
  done = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'Ensemble of 4 members from 2 variants' in done.stdout
  assert _json(os.path.join(workdir, 'results.json'))['test_loss'] == before['test_loss']
  # predict averages every member of every variant, as results.json's figures do.
  images, labels = synthetic_digits(20, seed=5)
  np.save(tmp_path / 'digits.npy', images)
  predict = subprocess.run(base + ['--mode=predict', f'--inputs={tmp_path / "digits.npy"}'],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert predict.returncode == 0, predict.stderr[-2000:]
  rows = predict.stdout.strip().splitlines()[1:]
  assert len(rows) == 20
  assert np.mean([int(row.split(',')[1]) for row in rows] == labels) >= 0.9
  report = subprocess.run(base + ['--mode=report'], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert report.returncode == 2
  assert report.stderr.strip().splitlines()[-1].startswith('error: --mode=report takes one '
                                                           'variant')
