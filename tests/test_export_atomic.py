"""--mode=export end to end through launch.py: an export is all or nothing (a signal or a kill
-9 in the middle leaves the previous export whole, and the next export cleans what a killed one
left), a bfloat16 run's two files compute one function, an export needs no --config (the
workdir's stored config is used), and --member exports one member of a population."""
import os
import pathlib
import signal
import subprocess

import numpy as np
import pytest

import digitjax
from conftest import ROOT, launch_args, small_config, wait_for
from digitjax import modes
from test_export import _digitjax_probabilities, _onnx_probabilities, images, ort  # noqa: F401

TOLERANCE = 1e-5  # max abs difference of a probability between the two files, or to digitjax
SMALL = {'model.conv_features': (8, 16, 16), 'model.dense_features': 32}  # not the default's
PAUSED = 'digitjax: paused at exporting'


def _savedmodel_probabilities(folder, images_Nx28x28):
  import tensorflow as tf
  loaded = tf.saved_model.load(str(pathlib.Path(folder) / 'savedmodel'))
  return loaded.serve(tf.constant(images_Nx28x28))['probabilities'].numpy()


def _both(ort, folder, images_Nx28x28):
  """The two files' probabilities: (SavedModel's, ONNX's)."""
  return (_savedmodel_probabilities(folder, images_Nx28x28),
          _onnx_probabilities(ort, pathlib.Path(folder) / 'model.onnx', images_Nx28x28))


def _max_difference(got, want) -> float:
  assert got.shape == want.shape, (got.shape, want.shape)
  diff = float(np.abs(got - want).max())
  assert diff <= TOLERANCE and (got.argmax(-1) == want.argmax(-1)).all(), diff
  return diff


def _temporaries(workdir) -> list[str]:
  """What an export writes aside or moves aside, anywhere in the workdir."""
  return sorted(os.path.relpath(os.path.join(root, name), workdir)
                for root, dirs, files in os.walk(workdir) for name in dirs + files
                if name.endswith(('.tmp', '.old')))


def _one_export_of(ort, folder, want, images_Nx28x28, label):
  """`folder` holds one complete export, both files computing `want` (within TOLERANCE)."""
  assert sorted(os.listdir(folder)) == ['model.onnx', 'savedmodel'], os.listdir(folder)
  savedmodel, onnx = _both(ort, folder, images_Nx28x28)
  diffs = _max_difference(savedmodel, want), _max_difference(onnx, want)
  print(f'{label}: max abs probability difference to digitjax: SavedModel {diffs[0]:.2e}, '
        f'ONNX {diffs[1]:.2e}')


def _paused_export(processes, tmp_path, name, *args):
  """launch.py --mode=export held at the 'exporting' phase; returns (process, stderr file)."""
  err = tmp_path / f'{name}.err'
  with open(tmp_path / f'{name}.out', 'w') as out, open(err, 'w') as errors:
    proc = processes.popen(launch_args(*args, '--mode=export', '--debug_pause_at=exporting'),
                           cwd=ROOT, stdout=out, stderr=errors)
  wait_for(proc, err.read_text, PAUSED)
  return proc, err


@pytest.fixture(scope='module')
def two_steps(idx_dir, tfds_dir, tmp_path_factory):
  """A run of two epochs: checkpoints at steps 22 and 44, which predict differently."""
  config = small_config(idx_dir, tfds_dir, num_epochs=2, **SMALL)
  workdir = str(tmp_path_factory.mktemp('two_steps'))
  digitjax.train(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_an_interrupted_or_killed_export_leaves_the_previous_export_whole(
    ort, two_steps, images, tmp_path, processes):
  config, workdir = two_steps
  folder = os.path.join(workdir, 'export')
  step = {s: _digitjax_probabilities(config, workdir, images, checkpoint=s) for s in ('22', '44')}
  assert float(np.abs(step['22'] - step['44']).max()) > 0.05  # the two exports differ
  modes.run_export(config, workdir, checkpoint='22')
  _one_export_of(ort, folder, step['22'], images, 'step 22')

  # SIGINT once the new SavedModel is written aside, before the ONNX model: step 22's export
  # stays, both files of it, and nothing of step 44's is left.
  proc, err = _paused_export(processes, tmp_path, 'sigint', f'--workdir={workdir}',
                             '--checkpoint=44')
  proc.send_signal(signal.SIGINT)
  assert proc.wait() == 130, err.read_text()[-3000:]
  assert _temporaries(workdir) == []
  _one_export_of(ort, folder, step['22'], images, 'step 22 after SIGINT')
  last = err.read_text().strip().splitlines()[-1]
  assert last.startswith('stopped by SIGINT while exporting') and (
      f'{folder} still holds the previous export, unchanged' in last), last
  assert 'Traceback' not in err.read_text()

  # kill -9 at the same moment: its temporary is left (named by its pid), the previous export
  # is whole; the next export removes the dead process's temporary and replaces the export.
  proc, err = _paused_export(processes, tmp_path, 'kill', f'--workdir={workdir}',
                             '--checkpoint=44')
  os.killpg(proc.pid, signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  left = _temporaries(workdir)
  assert left == [f'export.{proc.pid}.tmp'], left
  _one_export_of(ort, os.path.join(workdir, 'export'), step['22'], images, 'step 22 after kill')
  modes.run_export(config, workdir, checkpoint='44')
  assert _temporaries(workdir) == []
  _one_export_of(ort, folder, step['44'], images, 'step 44')


@pytest.fixture(scope='module')
def bfloat16_run(idx_dir, tfds_dir, tmp_path_factory):
  config = small_config(idx_dir, tfds_dir, **{'model.dtype': 'bfloat16', **SMALL})
  workdir = str(tmp_path_factory.mktemp('bfloat16'))
  digitjax.train(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_a_bfloat16_run_exports_one_float32_function_without_a_config(
    ort, bfloat16_run, images, processes):
  """Only --workdir: the stored config (bfloat16, and widths the default config does not have,
  so that its checkpoint restores under no other) is used. Both files compute in float32 from
  the float32 parameters: they agree with each other and with digitjax's float32 evaluation."""
  config, workdir = bfloat16_run
  proc = processes.run(launch_args(f'--workdir={workdir}', '--mode=export'), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  folder = os.path.join(workdir, 'export')
  assert proc.stdout.splitlines() == [
      f'Wrote {folder}/{name}: {kind} of checkpoint step 22 (best): uint8 images (N, 28, 28) -> '
      f'probabilities (N, 10)' for name, kind in (('savedmodel', 'TensorFlow SavedModel'),
                                                  ('model.onnx', 'ONNX model'))]
  savedmodel, onnx = _both(ort, folder, images)
  between = _max_difference(savedmodel, onnx)
  float32 = _digitjax_probabilities(small_config(config.data.manual_dir, config.data.data_dir,
                                                 **SMALL), workdir, images)
  bfloat16 = _digitjax_probabilities(config, workdir, images)
  print(f'bfloat16 run: max abs probability difference SavedModel-ONNX {between:.2e}, '
        f'SavedModel-digitjax float32 {_max_difference(savedmodel, float32):.2e}, '
        f'SavedModel-digitjax bfloat16 {float(np.abs(savedmodel - bfloat16).max()):.2e}')


@pytest.fixture(scope='module')
def population(idx_dir, tfds_dir, tmp_path_factory):
  config = small_config(idx_dir, tfds_dir, **{'sweep.grid': 'seed=0,1', **SMALL})
  workdir = str(tmp_path_factory.mktemp('population'))
  results = digitjax.train(config, workdir)
  return config, workdir, results


@pytest.mark.slow
def test_launch_exports_one_member_of_a_population(ort, population, images, tmp_path,
                                                   processes):
  config, workdir, results = population
  names = [m['name'] for m in results['members']]
  want = {n: _digitjax_probabilities(config, workdir, images, member=n) for n in names}
  assert float(np.abs(want[names[0]] - want[names[1]]).max()) > 1e-3  # the members differ
  other = names[0] if results['selected'] == [names[1]] else names[1]  # not the delivered one
  out = tmp_path / 'member'
  proc = processes.run(launch_args(f'--workdir={workdir}', '--mode=export', f'--member={other}',
                                   f'--output={out}'), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [line.split(': ', 1)[1] for line in proc.stdout.splitlines()] == [
      f'{kind} of checkpoint step 22 (best) of member {other}: uint8 images (N, 28, 28) -> '
      f'probabilities (N, 10)' for kind in ('TensorFlow SavedModel', 'ONNX model')]
  _one_export_of(ort, out, want[other], images, f'member {other}')
  assert not os.path.exists(os.path.join(workdir, 'export'))
