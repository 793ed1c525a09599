"""Robustness to other handwriting: the synthetic stresses (augment.STRESSES), the test figures
under them (modes.run_stress) and benchmarks/robustness.py, which compares workdirs in one
table."""
import json
import shutil
import sys

import numpy as np
import pytest

import digitjax
from conftest import ROOT, launch_args, small_config, synthetic_digits
from digitjax import augment, data, inference, modes
from digitjax.errors import UserError

sys.path.insert(0, str(ROOT / 'benchmarks'))
import robustness  # noqa: E402  (benchmarks/robustness.py)

LATEST = modes.Request('eval', 'latest')


def _digits(n=12):
  images, _ = synthetic_digits(n, 5)
  return images[..., None]  # uint8, as the splits hold them


def _blank(n=1):
  return np.zeros((n, 28, 28, 1), np.uint8)


def _strokes():
  """Pen strokes on a black background, 2 px wide, as MNIST's: a '7' (a bar and an upright),
  an 'L' and a '1' (an upright alone, columns 13-14, rows 4-23)."""
  x = _blank(3)
  x[0, 5:7, 8:20], x[0, 5:23, 18:20] = 255, 255
  x[1, 4:22, 9:11], x[1, 20:22, 9:19] = 255, 255
  x[2, 4:24, 13:15] = 255
  return x


def _ink(x):
  return np.asarray(x, np.float64).sum((1, 2, 3))


def _centre(image):
  """(row, column) of an image's centre of mass."""
  weights = np.asarray(image[..., 0], np.float64)
  rows, cols = np.indices(weights.shape)
  return np.array([(rows * weights).sum(), (cols * weights).sum()]) / weights.sum()


def _mean_column(image, rows):
  ink = np.argwhere(np.asarray(image[rows, :, 0]) > 127)
  return ink[:, 1].mean()


# ---------------------------------------------------------------------------------------------
# The stresses


@pytest.mark.parametrize('name', list(augment.STRESSES))
def test_each_stress_keeps_shape_dtype_range_and_order_and_is_deterministic(name):
  x = np.concatenate([_digits(), _strokes()])
  y = np.asarray(augment.stressed(x, name))
  assert y.shape == x.shape and y.dtype == np.uint8
  assert not np.array_equal(y, x)  # it changes the images
  assert np.array_equal(np.asarray(augment.stressed(x, name)), y)  # the same every time
  # In float32, the same values before rounding, within [0, 255].
  f = np.asarray(augment.stressed(x.astype(np.float32), name))
  assert f.dtype == np.float32 and f.min() >= 0.0 and f.max() <= 255.0
  assert np.array_equal(np.round(f).astype(np.uint8), y)
  # Each image is changed on its own: image i is still image i's digit, so labels still apply.
  for i in range(len(x)):
    alone = np.asarray(augment.stressed(x[i:i + 1].astype(np.float32), name))[0]
    np.testing.assert_allclose(alone, f[i], atol=1e-3)
  # A blank image stays blank.
  assert not np.asarray(augment.stressed(_blank(2), name)).any()


def test_dilation_adds_ink_and_erosion_removes_it():
  x = _strokes()
  ink = {name: _ink(augment.stressed(x, name)) for name in ('thin', 'thick', 'thicker')}
  assert np.all(ink['thin'] < _ink(x)) and np.all(ink['thin'] > 0)
  assert np.all(_ink(x) < ink['thick']) and np.all(ink['thick'] < ink['thicker'])
  # 2 px strokes: 1 px thicker is 1.5 times the ink, thinner half of it (ends aside).
  np.testing.assert_allclose(ink['thick'] / _ink(x), 1.5, atol=0.1)
  np.testing.assert_allclose(ink['thin'] / _ink(x), 0.5, atol=0.1)
  # thick grows down and right by one pixel; thicker by one pixel on every side (moved back,
  # a centred 3x3 dilation): its ink box is the digit's, one pixel wider all round.
  for i, image in enumerate(x):
    box = _box(image)
    assert _box(np.asarray(augment.stressed(x, 'thick'))[i]) == (box[0], box[1] + 1, box[2],
                                                                 box[3] + 1)
    assert _box(np.asarray(augment.stressed(x, 'thicker'))[i]) == (box[0] - 1, box[1] + 1,
                                                                   box[2] - 1, box[3] + 1)


def _box(image):
  """(top, bottom, left, right) of an image's ink (pixels > 0)."""
  ink = np.argwhere(np.asarray(image[..., 0]) > 0)
  return (*(int(v) for v in (ink[:, 0].min(), ink[:, 0].max(), ink[:, 1].min(), ink[:, 1].max())),)


def test_slant_and_rotation_tilt_an_upright_stroke_the_way_their_names_say():
  one = _strokes()[2:]  # columns 13-14, rows 4-23
  top, bottom = slice(4, 9), slice(19, 24)
  tilt = lambda name: (_mean_column(np.asarray(augment.stressed(one, name))[0], top)
                       - _mean_column(np.asarray(augment.stressed(one, name))[0], bottom))
  assert _mean_column(one[0], top) == _mean_column(one[0], bottom) == 13.5
  # Sheared 0.3: rows 15 apart end 4.5 px apart; the top to the right is italic.
  assert tilt('slant_right') == pytest.approx(4.5, abs=1.0)
  assert tilt('slant_left') == pytest.approx(-4.5, abs=1.0)
  # Counter-clockwise as seen on screen (rows down): the top goes left. 20 degrees over the
  # 15 rows between the bands' centres: 15 tan(20) = 5.5 px.
  assert tilt('rotate_ccw') == pytest.approx(-5.5, abs=1.5)
  assert tilt('rotate_cw') == pytest.approx(5.5, abs=1.5)


def test_off_centre_moves_whole_pixels_toward_the_most_room():
  x = _blank(4)
  x[0, 12:16, 2:6] = 200      # near the left edge: 22 px of room on the right -> 6 right
  x[1, 12:16, 19:23] = 200    # near the right edge: 19 px on the left -> 6 left
  x[2, 5:23, 5:23] = 200      # 5 px of room on every side: the first side (right), 5 px
  x[3, 3:25, 3:25] = 200      # 3 px of room everywhere: at least 4 px, so a column leaves
  y = np.asarray(augment.stressed(x, 'off_centre'))
  assert np.array_equal(y[0, :, 6:], x[0, :, :-6]) and not y[0, :, :6].any()
  assert np.array_equal(y[1, :, :-6], x[1, :, 6:]) and not y[1, :, -6:].any()
  assert np.array_equal(y[2, :, 5:], x[2, :, :-5]) and _ink(y[2:3]) == _ink(x[2:3])
  assert np.array_equal(y[3, :, 4:], x[3, :, :-4])
  assert _ink(y[3:4]) == _ink(x[3:4]) - 22 * 200  # the one column past the frame
  # Wider than tall: the most room is above and below (13 px each; the tie goes down).
  bar = _blank()
  bar[0, 13:15, 6:22] = 255
  assert np.array_equal(np.asarray(augment.stressed(bar, 'off_centre'))[0, 19:21], bar[0, 13:15])


def test_small_and_large_shrink_and_grow_the_digit_about_the_centre():
  x = _blank()
  x[0, 6:22, 6:22] = 255  # a 16x16 square about the centre
  width = lambda name: np.ptp(np.argwhere(np.asarray(augment.stressed(x, name))[0, ..., 0] > 127)
                              [:, 1]) + 1
  assert width('small') == 12 and width('large') in (19, 20)
  # Bilinear sampling keeps the ink per area: scaled by s, the ink is s^2 times.
  area = lambda name: _ink(augment.stressed(x.astype(np.float32), name)) / _ink(x)
  assert area('small') == pytest.approx(0.75 ** 2, abs=0.01)
  assert area('large') == pytest.approx(1.2 ** 2, abs=0.02)
  np.testing.assert_allclose(_centre(np.asarray(augment.stressed(x, 'small'))[0]), 13.5, atol=0.1)


def test_unknown_stress_names_are_refused_naming_the_known_ones():
  with pytest.raises(KeyError, match='thicker'):
    augment.stressed(_digits(2), 'bold')
  assert modes.check_stresses(None) == modes.check_stresses('all') == list(augment.STRESSES)
  assert modes.check_stresses(' thin, thick ') == ['thick', 'thin']  # STRESSES' order
  for bad in ('thick,bold', ',', 'clean'):
    with pytest.raises(UserError) as e:
      modes.check_stresses(bad)
    assert '\n' not in str(e.value) and 'off_centre' in str(e.value)
  assert "'bold'" in _message(lambda: modes.check_stresses('thick,bold'))


def _message(call) -> str:
  with pytest.raises(UserError) as e:
    call()
  return str(e.value)


# ---------------------------------------------------------------------------------------------
# The figures, and the table of several workdirs


@pytest.fixture(scope='module')
def runs(idx_dir, tfds_dir, tmp_path_factory):
  """Two synthetic runs of one epoch (seeds 0 and 1), shared by the module."""
  found = []
  for seed in (0, 1):
    config = small_config(idx_dir, tfds_dir, seed=seed)
    workdir = str(tmp_path_factory.mktemp(f'robust_run{seed}'))
    found.append((config, workdir, digitjax.train(config, workdir)))
  return found


def test_run_stress_reports_each_stress_beside_the_plain_test_figure(runs):
  config, workdir, results = runs[0]
  r = modes.run_stress(config, workdir, request=LATEST)
  assert list(r['test_accuracy']) == [modes.CLEAN] + list(augment.STRESSES)
  assert list(r['stresses']) == list(augment.STRESSES) and r['test_examples'] == 100
  # 'clean' is the test figure the run reported, exactly.
  assert r['test_accuracy']['clean'] == results['test_accuracy']
  assert r['test_loss']['clean'] == results['test_loss']
  assert all(0.0 <= a <= 1.0 for a in r['test_accuracy'].values())
  assert all(np.isfinite(l) for l in r['test_loss'].values())
  # The synthetic digits' label is where their blob is: moved 4 px, most are misread.
  assert results['test_accuracy'] > 0.8
  assert r['test_accuracy']['off_centre'] < results['test_accuracy'] - 0.3
  assert r['test_loss']['off_centre'] > r['test_loss']['clean']
  again = modes.run_stress(config, workdir, 'off_centre,thick', LATEST)
  assert again['test_accuracy'] == {k: r['test_accuracy'][k] for k in ('clean', 'thick',
                                                                      'off_centre')}


def test_run_stress_on_the_validation_split_never_reads_the_test_figures(runs, capsys):
  config, workdir, results = runs[0]
  r = modes.run_stress(config, workdir, 'thin,off_centre',
                       modes.Request('eval', 'latest', 'validation'))
  assert r['split'] == 'validation' and not any(k.startswith('test_') for k in r)
  # 'clean' is the validation figure the run reported, on its held-out images.
  assert r['val_accuracy']['clean'] == results['val_accuracy']
  assert r['val_loss']['clean'] == results['val_loss']
  assert r['val_examples'] == len(data.load_splits(config).val['label']) > 0
  assert r['val_accuracy']['off_centre'] < r['val_accuracy']['clean']
  assert "--split='val' is unknown" in _message(
      lambda: modes.run_stress(config, workdir, request=modes.Request('eval', 'latest', 'val')))
  # The benchmark's table names the split and shows the same figures.
  assert robustness.main(['--workdir', workdir, '--checkpoint', 'latest', '--stress', 'thin',
                          '--split', 'validation']) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('|')]
  assert rows[2] == (f'| clean | the validation split as it is | '
                     f'{r["val_accuracy"]["clean"]:.4f} |')
  assert rows[3].endswith(f'| {r["val_accuracy"]["thin"]:.4f} |')
  assert robustness.main(['--workdir', workdir, '--split', 'val']) == 2
  assert "error: --split='val' is unknown" in capsys.readouterr().err
  # --member names a population's member; this run has none.
  assert robustness.main(['--workdir', workdir, '--member', '0']) == 2
  assert 'has no members; leave --member out' in capsys.readouterr().err


def test_the_benchmark_compares_workdirs_in_one_table(runs, tmp_path, capsys):
  (_, first, r0), (_, second, r1) = runs
  out, picture = tmp_path / 'robustness.json', tmp_path / 'stresses.png'
  assert robustness.main(['--workdir', first, second, '--checkpoint', 'latest', '--stress',
                          'thin,off_centre', '--json', str(out), '--picture', str(picture)]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('|')]
  assert rows[0] == f'| stress | what | `{first}` | `{second}` |'
  assert [row.split(' | ')[0] for row in rows[2:]] == [
      '| clean', '| thin', '| off_centre', '| mean of the 2 stresses', '| score']
  found = json.loads(out.read_text())
  assert [f['workdir'] for f in found] == [first, second]
  assert [f['test_accuracy']['clean'] for f in found] == [r0['test_accuracy'],
                                                         r1['test_accuracy']]
  assert rows[2].endswith(f'| {r0["test_accuracy"]:.4f} | {r1["test_accuracy"]:.4f} |')
  mean = (found[1]['test_accuracy']['thin'] + found[1]['test_accuracy']['off_centre']) / 2
  assert rows[-2].endswith(f'| **{mean:.4f}** |')
  assert rows[-1].endswith(f'| {(found[1]["test_accuracy"]["clean"] + mean) / 2:.4f} |')
  # The picture: 8 test images a row, as they are and under each of the 10 stresses.
  from PIL import Image
  with Image.open(picture) as image:
    assert image.mode == 'L' and image.height > image.width


def test_the_benchmark_refuses_bad_input_in_one_line(runs, tmp_path, capsys):
  _, workdir, _ = runs[0]
  unknown = robustness.main(['--workdir', workdir, '--stress', 'bold'])
  assert unknown == 2
  # A workdir that holds a run's results but no checkpoint, and one that holds nothing.
  no_checkpoint = tmp_path / 'results_only'
  no_checkpoint.mkdir()
  shutil.copy(f'{workdir}/results.json', no_checkpoint / 'results.json')
  assert robustness.main(['--workdir', str(no_checkpoint)]) == 2
  assert robustness.main(['--workdir', str(tmp_path / 'empty')]) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 3 and all(line.startswith('error: ') for line in lines), lines
  assert "'bold' is unknown" in lines[0] and 'thicker' in lines[0]
  assert 'no checkpoint' in lines[1] and 'holds no trained run' in lines[2]
  assert '|' not in captured.out  # no table for bad input


# ---------------------------------------------------------------------------------------------
# Other writers' digits: the uci_digits split (data.uci_digits)


def test_uci_digits_are_other_writers_digits_in_mnist_form():
  u = data.uci_digits('mnist')
  x, y = u['image'], u['label']
  assert x.shape == (1797, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
  assert set(np.unique(y)) == set(range(10)) and np.bincount(y).min() >= 170
  # MNIST form, as predict makes a user's picture: the ink fills a 20 px box on its longer side,
  # peaks at full white, and its centre of mass is at (14, 14) to within the whole-pixel shift.
  for image in x:
    rows, cols = np.nonzero(image[..., 0])
    assert max(np.ptp(rows), np.ptp(cols)) + 1 == 20 and image.max() == 255
    assert np.all(np.abs(_centre(image) - 14.0) <= 0.51)
  # The labels go with their images: 1s are the narrowest digits, 0s hold no ink in the middle.
  wide = np.array([np.ptp(np.nonzero((i[..., 0] > 127).any(0))[0]) + 1 for i in x])
  middle = x[:, 12:16, 12:16, 0].mean((1, 2))
  means = lambda v: np.array([v[y == k].mean() for k in range(10)])
  assert np.argmin(means(wide)) == 1 and np.argmin(means(middle)) == 0
  assert means(middle)[0] < 0.5 * np.sort(means(middle))[1]
  # Each call hands out its own arrays: a caller that writes into them changes no one else's.
  x[:] = 0
  assert np.array_equal(data.uci_digits('mnist')['label'], y)
  assert data.uci_digits('mnist')['image'].max() == 255


def test_uci_digits_refuse_a_model_of_other_things_and_say_what_they_need(monkeypatch):
  message = _message(lambda: data.uci_digits('fashion_mnist'))
  assert '\n' not in message and 'learned fashion_mnist' in message and '--split=test' in message
  monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)  # as if scikit-learn were absent
  message = _uci_message()
  assert '\n' not in message and 'pip install scikit-learn' in message


def _uci_message() -> str:
  """The UserError of reading the UCI digits afresh (not from the cache of an earlier read)."""
  data._uci_digits.cache_clear()
  try:
    return _message(lambda: data.uci_digits('mnist'))
  finally:
    data._uci_digits.cache_clear()


def test_damaged_uci_digits_are_one_line_that_says_reinstall(monkeypatch, tmp_path):
  import gzip
  import sklearn.datasets
  damaged = tmp_path / 'digits.csv.gz'
  rows = np.random.default_rng(0).integers(0, 17, (500, 65))
  text = '\n'.join(','.join(map(str, row)) for row in rows).encode()
  whole = gzip.compress(text)
  damaged.write_bytes(whole[:len(whole) // 2])  # cut off mid-stream
  def load_damaged():  # reads the damaged file as load_digits reads its own
    return np.loadtxt(gzip.open(damaged), delimiter=',')
  monkeypatch.setattr(sklearn.datasets, 'load_digits', load_damaged)
  message = _uci_message()
  assert '\n' not in message and 'reinstall scikit-learn' in message


def test_eval_and_the_benchmark_read_other_writers_digits(runs, tmp_path, capsys):
  config, workdir, results = runs[0]
  r = modes.run_eval(config, workdir, 'latest', data.UCI_DIGITS)
  assert r['split'] == 'uci_digits' and r['uci_digits_examples'] == 1797
  assert not any(k.startswith(('test_', 'val_')) for k in r)
  assert json.loads(open(f'{workdir}/eval.json').read())['uci_digits_accuracy'] == (
      r['uci_digits_accuracy'])
  # predict on the same images (an array in MNIST form) agrees with eval's figure.
  u = data.uci_digits('mnist')
  np.save(tmp_path / 'uci.npy', u['image'][..., 0])
  assert modes.run_predict(config, workdir, [str(tmp_path / 'uci.npy')],
                           str(tmp_path / 'p.csv'), 'latest') == 0
  predicted = np.loadtxt(tmp_path / 'p.csv', delimiter=',', skiprows=1, usecols=1, dtype=int)
  assert np.mean(predicted == u['label']) == pytest.approx(r['uci_digits_accuracy'], abs=1e-12)
  # The synthetic run learned blobs, not strokes: real digits it reads far below its own test
  # figure (a split mixed up with its test split would not be).
  assert r['uci_digits_accuracy'] < 0.5 < results['test_accuracy']
  capsys.readouterr()
  picture = tmp_path / 'uci.png'
  assert robustness.main(['--workdir', workdir, '--checkpoint', 'latest', '--stress', 'thin',
                          '--split', 'uci_digits', '--picture', str(picture)]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('|')]
  assert rows[2] == f'| clean | the uci_digits split as it is | {r["uci_digits_accuracy"]:.4f} |'
  assert picture.stat().st_size > 0


@pytest.mark.slow
def test_launch_evaluates_other_writers_digits(runs, processes):
  config, workdir, _ = runs[1]
  expected = modes.run_eval(config, workdir, 'latest', data.UCI_DIGITS)['uci_digits_accuracy']
  done = processes.run(launch_args(f'--workdir={workdir}', '--mode=eval', '--checkpoint=latest',
                                   '--split=uci_digits', '--config.plots=False'))
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'uci_digits_accuracy {expected:.4f}' in done.stdout + done.stderr
  assert '(1797 images)' in done.stdout + done.stderr


def test_workdirs_combined_are_measured_as_one_ensemble_of_their_members(runs, capsys):
  (c0, first, r0), (c1, second, r1) = runs
  r = modes.run_stress(c0, first, 'thin', LATEST, also=((c1, second),))
  assert r['workdir'] == f'{first} + {second}' and len(r['members']) == 2
  assert r['members'][0].startswith(f'{first}:') and r['members'][1].startswith(f'{second}:')
  # The mean probabilities of the two runs' members, as eval combines a population's.
  test = data.load_splits(c0).test
  logits = [one for c, w in ((c0, first), (c1, second))
            for one in modes.Restored(modes.target(c, w), 'latest', 'eval').member_logits(
                test['image'])]
  expected = inference.classification_metrics(inference.combine_logits(logits), test['label'])
  assert r['test_accuracy']['clean'] == expected['accuracy']
  assert r['test_loss']['clean'] == pytest.approx(expected['loss'], rel=1e-6)
  assert r['test_loss']['clean'] not in (r0['test_loss'], r1['test_loss'])
  # A run combined with itself is that run.
  alone = modes.run_stress(c0, first, 'thin', LATEST, also=((c0, first),))
  assert alone['test_accuracy'] == modes.run_stress(c0, first, 'thin', LATEST)['test_accuracy']
  # The benchmark: one column; runs of other holdouts refused on the validation split.
  capsys.readouterr()
  assert robustness.main(['--workdir', first, second, '--combine', '--checkpoint', 'latest',
                          '--stress', 'thin']) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('|')]
  assert rows[0] == f'| stress | what | `{first} + {second}` |'
  assert rows[2].endswith(f'| {expected["accuracy"]:.4f} |')
  assert robustness.main(['--workdir', first, second, '--combine', '--checkpoint', 'latest',
                          '--split', 'validation']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'holds out other validation images' in err[0], err
