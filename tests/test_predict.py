"""--mode=predict: pictures of digits in many forms brought to MNIST form and classified."""
import csv
import io
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

import digitjax
from conftest import ROOT, launch_args, small_config, workdir_snapshot, write_idx
from digitjax import data, images, inference, modes
from digitjax.errors import UserError


def _read_csv(text):
  rows = list(csv.reader(io.StringIO(text)))
  assert rows[0] == ['path', 'prediction', 'confidence']
  return {path: (int(p), float(c)) for path, p, c in rows[1:]}


def _eval_probabilities(config, workdir, images_Nx28x28):
  """What eval's own program gives for arrays that are already in MNIST form."""
  restored = modes.Restored(modes.target(config, workdir), 'best', 'predict')
  return inference.probabilities(inference.combine_logits(
      restored.member_logits(images_Nx28x28[..., None])))


def _eval_predictions(config, workdir, images_Nx28x28):
  return _eval_probabilities(config, workdir, images_Nx28x28).argmax(-1)


@pytest.fixture(scope='module')
def synthetic_run(idx_dir, tfds_dir, tmp_path_factory):
  config = small_config(idx_dir, tfds_dir)
  workdir = str(tmp_path_factory.mktemp('predict_run'))
  digitjax.train(config, workdir)
  return config, workdir


# ---------------------------------------------------------------------------------------------
# MNIST form


def _drawn_seven(size=(280, 330), ink='black', paper='white', mode='RGB'):
  image = Image.new(mode, size, paper)
  draw = ImageDraw.Draw(image)
  draw.line((60, 50, 230, 50), fill=ink, width=16)
  draw.line((230, 50, 120, 280), fill=ink, width=16)
  return image


def _gray(image):
  return np.asarray(image.convert('L'), np.float32) / 255


def test_a_drawing_is_fit_to_20x20_and_centred_by_mass():
  mnist = images.to_mnist(_gray(_drawn_seven()))
  assert mnist.shape == (28, 28) and mnist.dtype == np.uint8
  assert (mnist == 0).mean() > 0.6  # the white paper became MNIST's black background
  rows, cols = np.nonzero(mnist > 64)
  assert max(np.ptp(rows), np.ptp(cols)) + 1 in (19, 20, 21)
  mass = mnist.astype(np.float64) / mnist.sum()
  r, c = np.indices(mass.shape)
  assert abs((r * mass).sum() - 14) <= 0.5 and abs((c * mass).sum() - 14) <= 0.5
  assert mnist.max() == 255


def test_polarity_bit_depth_and_alpha_give_the_same_digit(tmp_path):
  reference = images.to_mnist(_gray(_drawn_seven()))
  inverted = images.to_mnist(_gray(_drawn_seven(ink='white', paper='black')))
  assert np.array_equal(reference, inverted)
  gray8 = np.asarray(_drawn_seven().convert('L'))
  Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / 'deep.png')
  assert Image.open(tmp_path / 'deep.png').mode.startswith('I')
  assert np.abs(images.to_mnist(images.read_image(str(tmp_path / 'deep.png'))).astype(int)
                - reference).max() <= 1
  # Black strokes on a clear sheet, with black under the clear pixels too: only alpha shows them.
  _drawn_seven(ink=(0, 0, 0, 255), paper=(0, 0, 0, 0), mode='RGBA').save(tmp_path / 'clear.png')
  assert np.abs(images.to_mnist(images.read_image(str(tmp_path / 'clear.png'))).astype(int)
                - reference).max() <= 1


@pytest.mark.parametrize('suffix', ['.png', '.jpg', '.bmp', '.gif', '.tif'])
def test_every_format_reads_to_the_same_digit(suffix, tmp_path):
  reference = images.to_mnist(_gray(_drawn_seven()))
  path = str(tmp_path / f'seven{suffix}')
  _drawn_seven().save(path)
  mnist = images.to_mnist(images.read_image(path))
  assert np.abs(mnist.astype(int) - reference).mean() < 3  # JPEG's ringing moves a few levels


def test_a_blank_picture_has_no_digit():
  with pytest.raises(images.InputError, match='blank image'):
    images.to_mnist(np.full((50, 40), 0.9, np.float32))


@pytest.fixture(scope='module')
def mnist_run(mnist_dir, tmp_path_factory):
  """Two short epochs on 7,200 real MNIST digits (about 96% accurate): a model worth asking."""
  source = tmp_path_factory.mktemp('mnist_subset')
  for split, prefix, count in (('train', 'train', 8000), ('test', 't10k', 1000)):
    x, y = data.read_idx_split(str(mnist_dir), split, 'mnist')
    write_idx(source / f'{prefix}-images-idx3-ubyte.gz', x[:count, ..., 0])
    write_idx(source / f'{prefix}-labels-idx1-ubyte.gz', y[:count])
  config = small_config(source, tmp_path_factory.mktemp('tfds_mnist_subset'), batch_size=32,
                        learning_rate=0.01, num_epochs=2, eval_batch_size=500)
  workdir = str(tmp_path_factory.mktemp('mnist_run'))
  digitjax.train(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_predict_agrees_with_eval_on_test_images_in_many_forms(mnist_run, tmp_path):
  config, workdir = mnist_run
  test_images, _ = data.read_idx_split(config.data.manual_dir, 'test', 'mnist', False)
  test_images = test_images[:150, ..., 0]
  expected = _eval_predictions(config, workdir, test_images)
  forms = {
      'gray28': lambda x: Image.fromarray(x),
      'rgb_large_dark_on_light': lambda x: Image.fromarray(255 - x).resize(
          (210, 210), Image.Resampling.BICUBIC).convert('RGB'),
      'rgba_black_on_clear': lambda x: Image.fromarray(
          np.dstack([np.zeros((28, 28, 3), np.uint8), x]), 'RGBA'),
      'gray16': lambda x: Image.fromarray(x.astype(np.uint16) * 257),
  }
  paths = {}
  for form, make in forms.items():
    for i, x in enumerate(test_images):
      path = str(tmp_path / f'{form}_{i:03d}.png')
      make(x).save(path)
      paths[path] = (form, i)
  assert Image.open(tmp_path / 'gray16_000.png').mode.startswith('I')  # really 16 bits deep
  output = str(tmp_path / 'predictions.csv')
  assert modes.run_predict(config, workdir, [str(tmp_path)], output) == 0
  with open(output) as f:
    predicted = _read_csv(f.read())
  assert set(predicted) == set(paths)
  for form in forms:
    agree = [predicted[p][0] == expected[i] for p, (f, i) in paths.items() if f == form]
    assert np.mean(agree) >= 0.95, (form, np.mean(agree))
  # The confidence of the 28x28 grayscale pictures is the top probability eval's own program
  # gives the pixels predict brought them to (MNIST form), to 4 decimals.
  gray = sorted(p for p, (f, _) in paths.items() if f == 'gray28')
  assert len(gray) == len(test_images)
  probabilities = _eval_probabilities(config, workdir, images.read_inputs(gray).images)
  assert [predicted[p] for p in gray] == [
      (int(q.argmax()), float(f'{q.max():.4f}')) for q in probabilities]


# ---------------------------------------------------------------------------------------------
# Arrays, folders and bad inputs


def test_arrays_are_classified_row_by_row_exactly_as_eval_would(synthetic_run, tmp_path):
  config, workdir = synthetic_run
  x, _ = data.read_idx_split(config.data.manual_dir, 'test', 'mnist', False)
  x = x[:6, ..., 0]
  np.save(tmp_path / 'rows.npy', x[:3, ..., None])                  # (N, 28, 28, 1) uint8
  np.savez(tmp_path / 'pair.npz', x=x[3:5] / 255.0, y=np.arange(2))  # [0, 1] floats beside labels
  np.save(tmp_path / 'one.npy', x[5])                                # a single 28x28 image
  output = str(tmp_path / 'out.csv')
  inputs = [str(tmp_path / n) for n in ('rows.npy', 'pair.npz', 'one.npy')]
  assert modes.run_predict(config, workdir, inputs, output) == 0
  with open(output) as f:
    predicted = _read_csv(f.read())
  names = [f'{inputs[0]}[{i}]' for i in range(3)] + [f'{inputs[1]}[x][{i}]' for i in range(2)]
  names.append(inputs[2])
  assert list(predicted) == names
  expected = _eval_predictions(config, workdir, x)
  assert [p for p, _ in predicted.values()] == expected.tolist()


def _zero_width_png(path):
  def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
  header = struct.pack('>IIBBBBB', 0, 28, 8, 0, 0, 0, 0)
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b''))
            + chunk(b'IEND', b''))


def _bad_and_good_inputs(folder, config):
  x, _ = data.read_idx_split(config.data.manual_dir, 'test', 'mnist', False)
  good = {'good_a.png': x[0, ..., 0], 'good_b.png': x[1, ..., 0]}
  for name, pixels in good.items():
    Image.fromarray(pixels).save(folder / name)
  (folder / 'empty.png').write_bytes(b'')
  (folder / 'notes.png').write_text('not a picture\n')
  noise = np.random.default_rng(0).integers(0, 255, (200, 200), np.uint8)  # compresses badly
  encoded = io.BytesIO()
  Image.fromarray(noise).save(encoded, 'PNG')
  (folder / 'truncated.png').write_bytes(encoded.getvalue()[:len(encoded.getvalue()) // 2])
  _zero_width_png(folder / 'zero.png')
  return sorted(good), {
      'empty.png': 'empty file',
      'notes.png': images.NOT_AN_IMAGE,
      'truncated.png': 'truncated PNG file (image file is truncated)',
      'zero.png': 'zero-size image (0x28 pixels)',
  }


@pytest.mark.slow
def test_each_bad_input_is_one_error_line_and_the_others_are_predicted(synthetic_run, tmp_path,
                                                                     processes):
  config, workdir = synthetic_run
  folder = tmp_path / 'inputs'
  folder.mkdir()
  good, bad = _bad_and_good_inputs(folder, config)
  missing = str(tmp_path / 'missing.png')
  paths = [str(folder / n) for n in good + sorted(bad)] + [missing]
  before = workdir_snapshot(workdir)
  proc = processes.run(launch_args(
      '--config=configs/default.py', f'--workdir={workdir}', '--mode=predict',
      f'--inputs={",".join(paths)}', '--config.eval_batch_size=50'), cwd=ROOT)
  assert proc.returncode == 1, proc.stderr[-2000:]
  expected_errors = [f'{folder / n}: error: {reason}' for n, reason in sorted(bad.items())]
  expected_errors.append(f'{missing}: error: no such file or folder')
  assert proc.stderr.splitlines() == expected_errors
  predicted = _read_csv(proc.stdout)
  assert list(predicted) == [str(folder / n) for n in good]
  # The good pictures, brought to MNIST form as predict does, through eval's own program.
  probabilities = _eval_probabilities(
      config, workdir, images.read_inputs([str(folder / n) for n in good]).images)
  assert [p for p, _ in predicted.values()] == probabilities.argmax(-1).tolist()
  assert [c for _, c in predicted.values()] == [float(f'{p.max():.4f}') for p in probabilities]
  assert workdir_snapshot(workdir) == before  # predict writes nothing into the workdir


def test_a_folder_stands_for_its_images_and_an_empty_one_is_an_error(synthetic_run, tmp_path,
                                                                       capsys):
  config, workdir = synthetic_run
  folder = tmp_path / 'digits'
  folder.mkdir()
  _drawn_seven().save(folder / 'b.jpg')
  _drawn_seven().save(folder / 'a.png')
  (folder / 'README.txt').write_text('not read: a folder means its images')
  (tmp_path / 'nothing').mkdir()
  status = modes.run_predict(config, workdir, [str(folder), str(tmp_path / 'nothing')])
  out, err = capsys.readouterr()
  assert status == 1
  assert list(_read_csv(out)) == [str(folder / 'a.png'), str(folder / 'b.jpg')]
  assert err.splitlines() == [f'{tmp_path / "nothing"}: error: no image or array files in '
                              f'this folder']


def _write_when_opened(path, data: bytes):
  """A thread that writes `data` into the FIFO `path` once a reader opens it, then closes it."""
  def write():
    with open(path, 'wb') as f:  # blocks until predict opens the FIFO to read it
      f.write(data)
  thread = threading.Thread(target=write, daemon=True)
  thread.start()
  return thread


def _release(path, thread):
  """Lets a writer that no reader came for finish (a failed test must not hang)."""
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  thread.join()
  os.close(fd)


def test_stdin_and_fifos_are_read_as_files(synthetic_run, tmp_path):
  # docs/reliability.md: `/dev/stdin` and pipes are read as files: a picture or an array sent
  # through one is classified as the same file on disk is.
  config, workdir = synthetic_run
  x, _ = data.read_idx_split(config.data.manual_dir, 'test', 'mnist', False)
  _drawn_seven().save(tmp_path / 'seven.png')
  np.save(tmp_path / 'rows.npy', x[:3, ..., 0])
  png, npy = (tmp_path / 'seven.png').read_bytes(), (tmp_path / 'rows.npy').read_bytes()
  os.mkfifo(tmp_path / 'pipe.png')
  os.mkfifo(tmp_path / 'pipe.npy')
  writers = [(tmp_path / 'pipe.png', _write_when_opened(tmp_path / 'pipe.png', png)),
             (tmp_path / 'pipe.npy', _write_when_opened(tmp_path / 'pipe.npy', npy))]
  read_end, write_end = os.pipe()
  os.write(write_end, png)  # a small PNG fits in the pipe's buffer
  os.close(write_end)
  saved_stdin = os.dup(0)
  os.dup2(read_end, 0)
  output = str(tmp_path / 'out.csv')
  inputs = [str(tmp_path / n) for n in ('seven.png', 'rows.npy', 'pipe.png', 'pipe.npy')]
  try:
    assert modes.run_predict(config, workdir, inputs + ['/dev/stdin'], output) == 0
  finally:
    os.dup2(saved_stdin, 0)
    os.close(saved_stdin)
    os.close(read_end)
    for path, thread in writers:
      _release(path, thread)
  with open(output) as f:
    predicted = _read_csv(f.read())
  assert list(predicted) == [inputs[0], *[f'{inputs[1]}[{i}]' for i in range(3)], inputs[2],
                             *[f'{inputs[3]}[{i}]' for i in range(3)], '/dev/stdin']
  assert predicted[inputs[2]] == predicted['/dev/stdin'] == predicted[inputs[0]]
  for i in range(3):
    assert predicted[f'{inputs[3]}[{i}]'] == predicted[f'{inputs[1]}[{i}]']
  assert [predicted[f'{inputs[1]}[{i}]'][0] for i in range(3)] == _eval_predictions(
      config, workdir, x[:3, ..., 0]).tolist()


def test_predict_needs_inputs_and_a_valid_checkpoint(synthetic_run, tmp_path):
  config, workdir = synthetic_run
  with pytest.raises(UserError, match='needs --inputs'):
    modes.run_predict(config, workdir, [])
  with pytest.raises(UserError, match='no checkpoint in'):
    modes.run_predict(config, str(tmp_path), ['x.png'])


@pytest.mark.slow
def test_mode_flags_are_checked_before_any_work(tmp_path, processes):
  proc = processes.run(launch_args('--config=configs/default.py', f'--workdir={tmp_path}',
                                   '--inputs=a.png'), cwd=ROOT, timeout=120)
  assert proc.returncode != 0
  assert '--inputs applies to --mode=predict only' in proc.stderr
