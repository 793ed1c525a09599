"""The run's pictures: drawn at the end of training and again by --mode=report."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import digitjax
from conftest import ROOT, launch_args, small_config, workdir_snapshot
from digitjax import data, report

# Pictures of digits are mostly black and white; charts mostly white with lines and text.
MIN_STD = {'samples.png': 60, 'predictions.png': 60, 'mistakes.png': 20, 'class_counts.png': 20,
           'curves.png': 15, 'confusion_matrix.png': 20}


def check_plot(path, min_std):
  with Image.open(path) as image:
    image.verify()  # a complete, valid PNG
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert 300 <= min(image.size) and max(image.size) <= 2000, image.size
    pixels = np.asarray(image.convert('L'), np.float64)
  assert pixels.std() > min_std, (path, pixels.std())  # not blank


@pytest.fixture(scope='module')
def run(idx_dir, tfds_dir, tmp_path_factory):
  """A synthetic run of two epochs with config.plots on: training draws the pictures."""
  config = small_config(idx_dir, tfds_dir, num_epochs=2, plots=True)
  workdir = str(tmp_path_factory.mktemp('report_run'))
  digitjax.train(config, workdir)
  return config, workdir


def test_training_draws_every_picture(run):
  _, workdir = run
  assert sorted(os.listdir(os.path.join(workdir, 'plots'))) == sorted(report.PLOT_FILES)
  for name in report.PLOT_FILES:
    check_plot(os.path.join(workdir, 'plots', name), MIN_STD[name])


@pytest.mark.slow
def test_report_mode_redraws_them_without_training_or_touching_the_run(run, processes):
  config, workdir = run
  plots = os.path.join(workdir, 'plots')
  drawn_in_training = {n: Image.open(os.path.join(plots, n)).convert('RGB')
                       for n in ('samples.png', 'confusion_matrix.png')}
  shutil.rmtree(plots)
  before = workdir_snapshot(workdir)
  proc = processes.run(launch_args(
      '--config=configs/default.py', f'--workdir={workdir}', '--mode=report',
      f'--config.data.manual_dir={config.data.manual_dir}',
      f'--config.data.data_dir={config.data.data_dir}', '--config.data.verify_checksums=False',
      '--config.eval_batch_size=50'), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'Drew 6 pictures of checkpoint step 44 (latest)' in proc.stdout
  assert 'Epoch' not in proc.stdout
  assert workdir_snapshot(workdir, skip=('plots',)) == before
  for name in report.PLOT_FILES:
    check_plot(os.path.join(plots, name), MIN_STD[name])
  # The same checkpoint and data give the same pictures as at the end of training.
  for name, image in drawn_in_training.items():
    assert np.array_equal(np.asarray(Image.open(os.path.join(plots, name)).convert('RGB')),
                          np.asarray(image))


def test_confusion_counts_and_pictures_of_mistakes_and_of_an_empty_history(tmp_path):
  labels = np.array([0, 1, 2, 2, 9, 9, 9])
  predictions = np.array([0, 1, 2, 7, 9, 4, 9])
  matrix = report.confusion_matrix(labels, predictions, 10)
  assert matrix.sum() == 7 and np.trace(matrix) == 5
  assert matrix[2, 7] == matrix[9, 4] == 1 and matrix[9, 9] == 2
  # Ten test digits of which the model gets three wrong, the 9 most confidently.
  rng = np.random.default_rng(0)
  test = {'image': rng.integers(0, 255, (10, 28, 28, 1)).astype(np.uint8),
          'label': np.arange(10, dtype=np.int32)}
  logits = np.eye(10, dtype=np.float32)[np.array([0, 1, 2, 3, 4, 5, 6, 1, 3, 0])]
  logits *= np.linspace(1, 9, 10, dtype=np.float32)[:, None]
  probabilities = np.asarray(jax.nn.softmax(logits))
  assert report.most_confident_mistakes(probabilities, test['label'], 2).tolist() == [9, 8]
  splits = data.Splits(train=test, val=test, test=test)
  paths = report.draw_all(str(tmp_path / 'plots'), splits, logits, history=[])
  assert [os.path.basename(p) for p in paths] == list(report.PLOT_FILES)
  for name in report.PLOT_FILES:
    check_plot(tmp_path / 'plots' / name, 10)  # an empty history still gives labelled axes


# ---------------------------------------------------------------------------------------------
# The history the curves are drawn from: metrics.jsonl kept whole (finding 14)


def _records(path):
  return [json.loads(line) for line in open(path).read().splitlines()]


def test_a_metrics_file_replaced_by_a_link_is_reported_as_such_and_nothing_is_lost(
    tmp_path, caplog):
  from digitjax import metrics, workdir as workdir_lib
  run = tmp_path / 'run'
  run.mkdir()
  foreign = tmp_path / 'notes.txt'
  foreign.write_text('{"step": 5, "epoch": 1, "val_accuracy": 0.5}\nshopping list\nmilk\n')
  before = foreign.read_bytes()
  (run / 'metrics.jsonl').symlink_to(foreign)
  writer = metrics.MetricWriter(workdir_lib.RunFiles.of(str(run)), enabled=True)
  writer.write(6, {'epoch': 2, 'val_accuracy': 0.75})
  writer.close()
  # The link's target is untouched; metrics.jsonl is the run's own file now.
  assert foreign.read_bytes() == before
  assert not os.path.islink(run / 'metrics.jsonl')
  assert _records(run / 'metrics.jsonl') == [{'step': 5, 'epoch': 1, 'val_accuracy': 0.5},
                                             {'step': 6, 'epoch': 2, 'val_accuracy': 0.75}]
  # What it held is kept aside, whole.
  assert (run / 'metrics.jsonl.damaged').read_bytes() == before
  message = [r.getMessage() for r in caplog.records if 'metrics.jsonl' in r.getMessage()]
  assert len(message) == 1 and '\n' not in message[0]
  assert f'a link to {foreign} was in its place' in message[0] and 'left untouched' in message[0]
  assert "2 line(s) that are not this run's records" in message[0]
  assert 'metrics.jsonl.damaged' in message[0] and 'cut off' not in message[0]


def test_tensorboard_files_are_written_without_importing_torch(tmp_path, processes):
  # Where torch is installed, tensorboardX imports it at its own import (2 s of a run's
  # start-up). A stand-in torch marks its import: digitjax's writers leave it unimported, and a
  # user's `import torch` afterwards still gets it.
  import sys
  (tmp_path / 'site' / 'torch').mkdir(parents=True)
  mark = tmp_path / 'torch-imported'
  (tmp_path / 'site' / 'torch' / '__init__.py').write_text(
      f'open({str(mark)!r}, "w").close()\nTensor = object\n')
  code = f"""if True:
    import os, sys
    from digitjax import metrics, workdir
    writer = metrics.MetricWriter(workdir.RunFiles.of({str(tmp_path / 'run')!r}), enabled=True)
    writer.write(1, {{'epoch': 1, 'val_accuracy': 0.5}})
    writer.close()
    metrics.write_hparams({str(tmp_path / 'hp')!r}, ['learning_rate'],
                          [{{'name': 'slot0', 'hparams': {{'learning_rate': 0.1}},
                            'metrics': {{'val_accuracy': [(1, 0.5)]}}}}], ['val_accuracy'])
    print('torch' in sys.modules, os.path.exists({str(mark)!r}))
    import torch
    print(os.path.exists({str(mark)!r}))"""
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path / 'site'), str(ROOT)])}
  proc = processes.run([sys.executable, '-c', code], env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ['False', 'False', 'True'], proc.stdout
  assert any('tfevents' in name for name in os.listdir(tmp_path / 'run' / 'tensorboard'))
  assert any('tfevents' in name for name in os.listdir(tmp_path / 'hp' / 'slot0'))


def test_foreign_lines_are_kept_aside_and_a_torn_last_line_is_only_cut_off(tmp_path, caplog):
  from digitjax import workdir as workdir_lib
  path = tmp_path / 'metrics.jsonl'
  good = ['{"step": 1, "epoch": 1}', '{"step": 2, "epoch": 2}']
  path.write_text(f'{good[0]}\nnot a record\n[1, 2]\n{good[1]}\n')
  original = path.read_bytes()
  workdir_lib.JsonLines(str(path))
  assert path.read_text() == ''.join(g + '\n' for g in good)
  assert (tmp_path / 'metrics.jsonl.damaged').read_bytes() == original
  assert "2 line(s) that are not this run's records" in caplog.text
  assert 'cut off' not in caplog.text
  # A second damaged file does not replace the first one kept aside.
  path.write_text(f'{good[0]}\ngarbage\n')
  workdir_lib.JsonLines(str(path))
  assert (tmp_path / 'metrics.jsonl.damaged').read_bytes() == original
  assert (tmp_path / 'metrics.jsonl.damaged.2').read_text() == f'{good[0]}\ngarbage\n'
  # A torn last line (a kill mid-write) is expected: cut off, nothing kept aside.
  caplog.clear()
  path.write_text(f'{good[0]}\n{good[1][:9]}')
  workdir_lib.JsonLines(str(path))
  assert path.read_text() == good[0] + '\n'
  assert 'removed 1 damaged line(s) (a write that was cut off)' in caplog.text
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'metrics.jsonl.damaged',
                                          'metrics.jsonl.damaged.2']


def test_a_dangling_link_is_not_written_through(tmp_path, caplog):
  from digitjax import workdir as workdir_lib
  path = tmp_path / 'metrics.jsonl'
  path.symlink_to(tmp_path / 'elsewhere' / 'gone.jsonl')
  log = workdir_lib.JsonLines(str(path))
  log.append({'step': 1})
  assert not (tmp_path / 'elsewhere').exists() and not os.path.islink(path)
  assert _records(path) == [{'step': 1}]
  assert f'a link to {tmp_path / "elsewhere" / "gone.jsonl"} was in its place' in caplog.text
