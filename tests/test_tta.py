"""Test-time augmentation (--tta=N of eval and predict): the mean softmax probability of the
image and N-1 fixed views (augment.TTA_VIEWS); with one view, plain evaluation exactly."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import digitjax
from conftest import ROOT, launch_args, small_config, synthetic_digits
from digitjax import augment, data, inference, modes, parallel, steps
from digitjax.errors import UserError


@pytest.fixture(scope='module')
def run(idx_dir, tfds_dir, tmp_path_factory):
  """One synthetic run of one epoch, shared by the module."""
  config = small_config(idx_dir, tfds_dir)
  workdir = str(tmp_path_factory.mktemp('tta_run'))
  return config, workdir, digitjax.train(config, workdir)


def _state_and_evaluator(config):
  state, spec, _ = steps.create(config, jax.random.key(0))
  return state, spec.model, inference.Evaluator.for_config(config, parallel.make_mesh())


def _images(n=37):
  images, _ = synthetic_digits(n, 5)
  return images[..., None]  # uint8, as the splits hold them


def test_the_views_are_the_image_and_its_one_pixel_shifts_and_small_rotations():
  assert augment.TTA_VIEWS[0] == (0.0, 0.0, 0.0)
  assert inference.tta_views(7) == ['identity', 'shifted right 1 px', 'shifted left 1 px',
                                    'shifted down 1 px', 'shifted up 1 px', 'rotated +10 deg',
                                    'rotated -10 deg']
  image = jnp.zeros((1, 28, 28, 1)).at[0, 10, 12, 0].set(200.0)
  where = lambda v: np.argwhere(np.asarray(augment.view(image, augment.TTA_VIEWS[v])[0, ..., 0])
                                > 199.99).tolist()
  assert [where(v) for v in range(5)] == [[[10, 12]], [[10, 13]], [[10, 11]], [[11, 12]],
                                          [[9, 12]]]
  # Whole-pixel shifts move pixel values exactly; the identity is the image itself.
  x = jnp.asarray(_images(4), jnp.float32)
  assert jnp.array_equal(augment.view(x, augment.TTA_VIEWS[0]), x)
  assert jnp.array_equal(augment.view(x, augment.TTA_VIEWS[1])[:, :, 1:], x[:, :, :-1])
  turned = augment.view(x, augment.TTA_VIEWS[5])
  assert turned.shape == x.shape and not jnp.array_equal(turned, x)


def test_one_view_is_plain_evaluation_exactly(config):
  state, _, evaluator = _state_and_evaluator(config)
  images = _images()
  plain = evaluator.logits(state, images)
  assert np.array_equal(evaluator.tta_logits(state, images, 1), plain)
  assert np.array_equal(evaluator.logits(state, images, view=0), plain)


@pytest.mark.parametrize('views', [2, 5, 7])
def test_k_views_are_the_mean_of_the_views_probabilities(config, views):
  state, model, evaluator = _state_and_evaluator(config)
  images = _images()
  tta = evaluator.tta_logits(state, images, views)
  assert tta.shape == (len(images), 10)
  # Each view computed on its own: moved on device, scaled, the model's softmax.
  x = jnp.asarray(images, jnp.float32)
  probabilities = [jax.nn.softmax(model.apply(state.variables(), augment.view(x, v) / 255.0))
                   for v in augment.TTA_VIEWS[:views]]
  mean = np.mean(np.asarray(probabilities, np.float64), axis=0)
  np.testing.assert_allclose(np.exp(inference.log_softmax64(tta)), mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(inference.probabilities(tta).sum(-1), 1.0, rtol=1e-6)
  assert not np.allclose(np.exp(inference.log_softmax64(tta)), probabilities[0], atol=1e-6)


def test_every_view_but_the_identity_shares_one_compiled_program(config, monkeypatch):
  """The views' numbers are the program's arguments, not constants: --tta=7 compiles the view
  program once (and the identity's plain eval_step once), not once per view."""
  traced = []
  view_eval_step = inference._view_eval_step
  monkeypatch.setattr(inference, '_view_eval_step',
                      lambda *a, **k: traced.append(1) or view_eval_step(*a, **k))
  state, _, evaluator = _state_and_evaluator(config)
  images = _images(120)  # three batches of 50, the last one padded
  evaluator.tta_logits(state, images, len(augment.TTA_VIEWS))
  assert len(traced) == 1
  evaluator.tta_logits(state, images, 3)  # the same program again
  assert len(traced) == 1

def test_eval_with_tta_says_which_views_and_one_view_reproduces_results_json(run, capsys):
  config, workdir, results = run
  plain = modes.run_eval(config, workdir, 'latest', 'test', tta=1)
  assert plain['test_accuracy'] == results['test_accuracy']
  assert plain['test_loss'] == results['test_loss'] and 'tta_views' not in plain
  result = modes.run_eval(config, workdir, 'latest', 'test', tta=3)
  assert result['tta_views'] == ['identity', 'shifted right 1 px', 'shifted left 1 px']
  with open(os.path.join(workdir, 'eval.json')) as f:
    assert json.load(f) == result
  # The figures are those of the mean probabilities of the three views.
  restored = modes.Restored(modes.target(config, workdir), 'latest', 'eval')
  test = data.load_splits(config).test
  logits = restored.member_logits(test['image'], 3)[0]
  assert result['test_accuracy'] == inference.classification_metrics(logits,
                                                                     test['label'])['accuracy']
  assert 'with test-time augmentation (3 views)' in capsys.readouterr().out


def test_predict_with_tta_gives_the_views_mean_probabilities(run, tmp_path):
  config, workdir, _ = run
  x = data.load_splits(config).test['image'][:20, ..., 0]
  np.save(tmp_path / 'digits.npy', x)
  output = str(tmp_path / 'tta.csv')
  request = modes.Request('predict', 'latest', inputs=[str(tmp_path / 'digits.npy')],
                          output=output, tta=5)
  assert modes.predict(config, workdir, request) == 0
  with open(output) as f:
    rows = list(f)[1:]
  restored = modes.Restored(modes.target(config, workdir), 'latest', 'predict')
  p = inference.probabilities(restored.member_logits(x[..., None], 5)[0])
  assert [int(r.split(',')[1]) for r in rows] == p.argmax(-1).tolist()
  assert [r.strip().split(',')[2] for r in rows] == [f'{c:.4f}' for c in p.max(-1)]


@pytest.mark.parametrize('views', [0, 8, -1])
def test_a_bad_number_of_views_is_one_line(run, views):
  config, workdir, _ = run
  with pytest.raises(UserError, match=rf'--tta={views} is invalid: give 1 \(no test-time '
                                      r'augmentation\) to 7 views \(identity, shifted right'):
    modes.run_eval(config, workdir, tta=views)
  with pytest.raises(UserError, match=rf'--tta={views} is invalid'):
    modes.predict(config, workdir, modes.Request('predict', inputs=['x.npy'], tta=views))


@pytest.mark.slow
def test_tta_flag_applies_to_eval_and_predict_only(tmp_path, processes):
  proc = processes.run(launch_args('--config=configs/default.py', f'--workdir={tmp_path}',
                                   '--tta=3'), cwd=ROOT, timeout=120)
  assert proc.returncode == 2
  assert '--tta applies to --mode=eval|predict only' in proc.stderr
