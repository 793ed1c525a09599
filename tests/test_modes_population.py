"""eval, predict and report on a population: what it delivers (its trained selection, or another
one given with --config.sweep.select on top), one member (--member), a member that diverged;
and what a member is: the single run of its overrides on the base config's holdout."""
import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

import digitjax
from conftest import small_config
from digitjax import configlib, data, inference, members as members_lib, metrics, modes
from digitjax.errors import UserError


@pytest.fixture(scope='module')
def pop(idx_dir, tfds_dir, tmp_path_factory):
  """Three seeds, one epoch, trained to deliver its `best` member."""
  config = small_config(idx_dir, tfds_dir, **{'sweep.grid': 'seed=0,1,2', 'sweep.select': 'best'})
  workdir = str(tmp_path_factory.mktemp('pop_best') / 'run')
  return config, workdir, digitjax.train(config, workdir)


def _with(config, **fields):
  """`config` with `--config.FIELD=VALUE` overrides given on top, as launch.py applies them."""
  copy = config.copy_and_resolve_references()
  for key, value in fields.items():
    configlib.set_field(copy, key.replace('__', '.'), value)
  return copy


def _member_logits(config, workdir, images, checkpoint):
  """Each member's logits of `images`, restored one member at a time (--member)."""
  return [modes.Restored(modes.target(config, workdir, str(i)), checkpoint, 'eval')
          .member_logits(images)[0] for i in range(len(members_lib.members_of(config, workdir)))]


def _mean_probabilities(member_logits):
  return np.mean([np.exp(inference.log_softmax64(l)) for l in member_logits], axis=0)


# ---------------------------------------------------------------------------------------------
# --config.sweep.select given on top (finding 4)


def test_a_select_given_on_top_chooses_what_eval_delivers(pop):
  config, workdir, results = pop
  assert len(results['selected']) == 1 and results['select'] == 'best'
  test = data.load_splits(config).test
  logits = _member_logits(config, workdir, test['image'], 'latest')
  names = [m['name'] for m in results['members']]
  # ensemble: every member, their mean probabilities.
  ensemble = modes.run_eval(_with(config, sweep__select='ensemble'), workdir, 'latest')
  assert ensemble['members'] == names
  expected = inference.classification_metrics(inference.combine_logits(logits), test['label'])
  assert (ensemble['test_accuracy'], ensemble['test_loss']) == (expected['accuracy'],
                                                                expected['loss'])
  # top2: the two best by validation accuracy (as training ranks them), never by test.
  by_val = sorted(results['members'], key=lambda m: (-m['val_accuracy'], m['index']))
  top2 = modes.run_eval(_with(config, sweep__select='top2'), workdir, 'latest')
  assert top2['members'] == [m['name'] for m in results['members'] if m in by_val[:2]]
  chosen = [logits[m['index']] for m in by_val[:2]]
  assert top2['test_loss'] == inference.classification_metrics(
      inference.combine_logits(chosen), test['label'])['loss']
  # The select it was trained with gives its results.json, as before.
  best = modes.run_eval(config, workdir, 'latest')
  assert best['members'] == results['selected'] == [by_val[0]['name']]
  assert best['test_loss'] == results['test_loss']
  with pytest.raises(UserError, match=r"select='top7' asks for more members than the "
                                      r"population has \(3\)"):
    modes.run_eval(_with(config, sweep__select='top7'), workdir)


def test_a_select_given_on_top_equals_training_with_it(pop, idx_dir, tfds_dir, tmp_path):
  # The same members trained to deliver their ensemble: eval of the `best` population with
  # select=ensemble on top gives the figures that population's training wrote, exactly.
  config, workdir, _ = pop
  ensemble_config = _with(config, sweep__select='ensemble')
  trained = digitjax.train(ensemble_config, str(tmp_path / 'ensemble'))
  given = modes.run_eval(ensemble_config, workdir, 'latest')
  assert given['members'] == trained['selected']
  assert (given['test_accuracy'], given['test_loss']) == (trained['test_accuracy'],
                                                          trained['test_loss'])
  val = modes.run_eval(ensemble_config, workdir, 'latest', 'validation')
  assert (val['val_accuracy'], val['val_loss']) == (trained['val_accuracy'],
                                                    trained['val_loss'])
  # predict on the population trained to deliver its ensemble: the same rows.
  np.save(tmp_path / 'digits.npy', data.load_splits(config).test['image'][:40])
  csvs = []
  for c, w in ((ensemble_config, str(tmp_path / 'ensemble')), (ensemble_config, workdir)):
    csvs.append(str(tmp_path / f'{len(csvs)}.csv'))
    assert modes.run_predict(c, w, [str(tmp_path / 'digits.npy')], csvs[-1]) == 0
  assert _read_csv(csvs[0]) == _read_csv(csvs[1])


def _read_csv(path):
  with open(path) as f:
    rows = list(csv.reader(io.StringIO(f.read())))
  assert rows[0] == ['path', 'prediction', 'confidence']
  return [(int(p), float(c)) for _, p, c in rows[1:]]


def test_predict_on_the_delivered_ensemble_and_on_one_member(pop, tmp_path):
  config, workdir, _ = pop
  x = data.load_splits(config).test['image'][:40]
  np.save(tmp_path / 'digits.npy', x)
  logits = _member_logits(config, workdir, x, 'best')
  # The ensemble: the argmax of the members' mean probabilities, and that mean as confidence.
  out = str(tmp_path / 'ensemble.csv')
  assert modes.run_predict(_with(config, sweep__select='ensemble'), workdir,
                           [str(tmp_path / 'digits.npy')], out) == 0
  rows = _read_csv(out)
  mean = _mean_probabilities(logits)
  assert [p for p, _ in rows] == mean.argmax(-1).tolist()
  np.testing.assert_allclose([c for _, c in rows], mean.max(-1), rtol=0, atol=5.1e-5)
  # --member: that member's own predictions and confidences.
  for i in (0, 2):
    out = str(tmp_path / f'member{i}.csv')
    assert modes.run_predict(config, workdir, [str(tmp_path / 'digits.npy')], out,
                             member=str(i)) == 0
    rows = _read_csv(out)
    own = np.exp(inference.log_softmax64(logits[i]))
    assert [p for p, _ in rows] == own.argmax(-1).tolist()
    np.testing.assert_allclose([c for _, c in rows], own.max(-1), rtol=0, atol=5.1e-5)


def _pixels(path):
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


def _expected_pictures(config, folder, test_logits, member_files):
  """The pictures run_report draws for these logits, drawn here into `folder`."""
  from digitjax import report
  splits = data.load_splits(config, firsts=True)
  report.draw_all(str(folder), splits, test_logits, metrics.read_history(member_files))
  return folder


@pytest.mark.parametrize('what', ['ensemble', 'member'])
def test_report_draws_the_delivered_ensemble_or_one_member(pop, tmp_path, what):
  config, workdir, results = pop
  test = data.load_splits(config).test
  logits = _member_logits(config, workdir, test['image'], 'latest')
  members = members_lib.members_of(config, workdir)
  if what == 'ensemble':
    given = _with(config, sweep__select='ensemble')
    paths = modes.run_report(given, workdir)
    folder, expected_logits = os.path.join(workdir, 'plots'), inference.combine_logits(logits)
    # The population's pictures mark every member delivered.
    assert all(m['selected'] for m in modes.target(given, workdir).results['members'])
    assert 'population_curves.png' in [os.path.basename(p) for p in paths]
  else:
    paths = modes.run_report(config, workdir, member='1')
    folder, expected_logits = members[1].files.plots, logits[1]
    assert all(p.startswith(folder) for p in paths)
  expected = _expected_pictures(config, tmp_path / 'expected', expected_logits,
                                members[0 if what == 'ensemble' else 1].files)
  for name in ('confusion_matrix.png', 'predictions.png', 'mistakes.png', 'curves.png'):
    assert os.path.join(folder, name) in paths
    assert np.array_equal(_pixels(os.path.join(folder, name)), _pixels(expected / name)), name


# ---------------------------------------------------------------------------------------------
# A member that diverged (finding 13)


@pytest.fixture(scope='module')
def diverged_pop(idx_dir, tfds_dir, tmp_path_factory):
  """Learning rates 0.02 and 1e20: the second member's loss is non-finite at once."""
  config = small_config(idx_dir, tfds_dir, **{'sweep.grid': 'learning_rate=0.02,1e20'})
  workdir = str(tmp_path_factory.mktemp('pop_diverged') / 'run')
  return config, workdir, digitjax.train(config, workdir)


def test_a_member_that_diverged_before_any_checkpoint_says_so(diverged_pop, tmp_path, capsys):
  config, workdir, results = diverged_pop
  at = results['members'][1]['diverged_at_step']
  assert at is not None and results['members'][1]['checkpoint_step'] is None
  message = (rf'member 01-learning_rate=1e\+20 diverged at step {at} \(the training loss became '
             rf'non-finite\) before any checkpoint, so it has none to use; pick another member')
  with pytest.raises(UserError, match=message) as raised:
    modes.run_eval(config, workdir, member='1')
  assert 'train with --mode=train' not in str(raised.value)
  assert '\n' not in str(raised.value)
  with pytest.raises(UserError, match=message):
    modes.run_predict(config, workdir, [str(tmp_path / 'x.png')], member='1')
  with pytest.raises(UserError, match=message):
    modes.run_report(config, workdir, member='learning_rate=1e+20')
  # The other member, and the population, are there to use; an ensemble never includes it.
  assert modes.run_eval(config, workdir, member='0')['test_accuracy'] is not None
  capsys.readouterr()
  ensemble = modes.run_eval(_with(config, sweep__select='ensemble'), workdir)
  assert ensemble['members'] == ['learning_rate=0.02']
  assert ('select=ensemble asked for 2 members; 1 diverged (learning_rate=1e+20), so the '
          'delivered model combines 1: learning_rate=0.02') in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# What a member is (finding 6)


def test_a_seed_member_is_its_single_run_with_the_base_split_seed(pop, idx_dir, tfds_dir,
                                                                  tmp_path):
  # README: members share the base config's holdout; a member equals the single run of its
  # overrides plus --config.data.split_seed=<base seed>, bit for bit.
  config, workdir, results = pop
  member = members_lib.members_of(config, workdir)[1]
  assert member.overrides == {'seed': 1} and config.seed == 0
  assert configlib.split_seed(member.config) == configlib.split_seed(config) == 0
  same_holdout = digitjax.train(small_config(idx_dir, tfds_dir, seed=1,
                                             **{'data.split_seed': config.seed}),
                                str(tmp_path / 'seed1_split0'))
  assert same_holdout['test_loss'] == results['members'][1]['test_loss']
  assert same_holdout['val_accuracy'] == results['members'][1]['val_accuracy']
  # Without it, seed 1 holds out other images: another run, other figures.
  own_holdout = digitjax.train(small_config(idx_dir, tfds_dir, seed=1), str(tmp_path / 'seed1'))
  assert configlib.split_seed(small_config(idx_dir, tfds_dir, seed=1)) == 1
  assert own_holdout['test_loss'] != results['members'][1]['test_loss']
