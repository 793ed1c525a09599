"""--mode=export: the SavedModel run by plain TensorFlow in a process that never imports JAX or
digitjax, the ONNX model run by onnxruntime, both against digitjax's own probabilities (the
Evaluator's logits, combined as eval and predict combine them)."""
import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import default
import digitjax
from conftest import (ROOT, cannot_mount, launch_args, small_config, synthetic_digits,
                      workdir_snapshot, write_idx)
from digitjax import data, export, inference, model as model_lib, modes
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError

TOLERANCE = 1e-5  # max abs difference of a probability


@pytest.fixture(scope='session')
def ort():
  """onnx and onnxruntime: a test is skipped where they are missing, but fails under CI (`CI`
  set), where a missing package must not pass as a green run."""
  missing = [name for name in ('onnx', 'onnxruntime')
             if importlib.util.find_spec(name) is None]
  if missing:
    why = f'{" and ".join(missing)} not installed (pip install onnx onnxruntime)'
    if os.environ.get('CI'):
      pytest.fail(f'export tests need them in CI: {why}', pytrace=False)
    pytest.skip(why)
  return importlib.import_module('onnxruntime')


@pytest.fixture(scope='module')
def images():
  """Synthetic digits, then pure noise (less confident outputs, where differences show)."""
  digits, _ = synthetic_digits(200, seed=5)
  noise = np.random.default_rng(6).integers(0, 256, (100, 28, 28)).astype(np.uint8)
  return np.concatenate([digits, noise])


def _max_difference(got, want) -> float:
  """Asserts what the exported files must give: the same shape, float32, the same argmax for
  every image, each probability within TOLERANCE; returns the largest difference."""
  assert got.shape == want.shape and got.dtype == np.float32, (got.shape, got.dtype)
  diff = float(np.abs(got - want).max()) if got.size else 0.0
  assert diff <= TOLERANCE, diff
  wrong = np.flatnonzero(got.argmax(-1) != want.argmax(-1))
  assert not len(wrong), f'{len(wrong)} images predicted differently, e.g. {wrong[:5]}'
  return diff


def _digitjax_probabilities(config, workdir, images_Nx28x28, member=None, checkpoint='best'):
  """What eval and predict compute for these images: each member's logits by its Evaluator,
  their mean probabilities for a population's selection."""
  restored = modes.Restored(modes.target(config, workdir, member), checkpoint, 'export')
  return inference.probabilities(inference.combine_logits(
      restored.member_logits(images_Nx28x28[..., None])))


# The SavedModel's reader: TensorFlow and numpy alone. JAX, Flax and digitjax are made
# unimportable (TensorFlow imports JAX for its TFLite tooling when JAX is installed, and does
# without it), and the report lists any of them that got imported all the same.
_TF_READER = """
import json, sys
for name in ('jax', 'jaxlib', 'flax', 'digitjax'):
  sys.modules[name] = None
import numpy as np
import tensorflow as tf
path, images_file, out_file = sys.argv[1:]
loaded = tf.saved_model.load(path)
images = np.load(images_file)
serve = loaded.signatures['serving_default']
by_signature = serve(images=tf.constant(images))['probabilities'].numpy()
by_function = loaded.serve(tf.constant(images))['probabilities'].numpy()
empty = loaded.serve(tf.zeros([0, 28, 28], tf.uint8))['probabilities'].shape
np.save(out_file, np.stack([by_signature, by_function]))
print(json.dumps({'inputs': {k: [v.dtype.name, v.shape.as_list()]
                             for k, v in serve.structured_input_signature[1].items()},
                  'outputs': sorted(serve.structured_outputs),
                  'empty': list(empty),
                  'imported': sorted(m for m in sys.modules
                                     if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'digitjax')
                                     and sys.modules[m] is not None)}))
"""


def _savedmodel_probabilities(path, images_Nx28x28, tmp_path, processes):
  """The SavedModel's probabilities, by its signature and by its function, from a fresh
  process (cwd outside the repository, so not even digitjax's folder is on its path)."""
  images_file, out_file = tmp_path / 'images.npy', tmp_path / 'tf_out.npy'
  np.save(images_file, images_Nx28x28)
  env = {**os.environ, 'PYTHONPATH': ''}
  proc = processes.run([sys.executable, '-c', _TF_READER, str(path), str(images_file),
                        str(out_file)], cwd=tmp_path, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report == {'inputs': {'images': ['uint8', [None, 28, 28]]},
                    'outputs': ['probabilities'], 'empty': [0, 10], 'imported': []}
  by_signature, by_function = np.load(out_file)
  np.testing.assert_array_equal(by_signature, by_function)
  return by_signature


def _onnx_probabilities(ort, path, images_Nx28x28):
  session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
      ('images', 'tensor(uint8)', ['N', 28, 28])]
  assert [o.name for o in session.get_outputs()] == ['probabilities']
  assert session.run(['probabilities'], {'images': images_Nx28x28[:0]})[0].shape == (0, 10)
  return session.run(['probabilities'], {'images': images_Nx28x28})[0]


def _check_both_files(folder, want, images_Nx28x28, tmp_path, processes, ort, label):
  """Both files of an export against `want`; prints and returns their largest differences."""
  diffs = {
      'savedmodel': _max_difference(_savedmodel_probabilities(
          folder / 'savedmodel', images_Nx28x28, tmp_path, processes), want),
      'onnx': _max_difference(_onnx_probabilities(ort, folder / 'model.onnx', images_Nx28x28),
                              want)}
  print(f'{label}: max abs probability difference on {len(images_Nx28x28)} images: '
        + ', '.join(f'{k} {v:.2e}' for k, v in diffs.items()))
  return diffs


# ---------------------------------------------------------------------------------------------
# The ONNX graph against the JAX function, on untrained models of two architectures (fast)


def _member(seed: int, **overrides):
  """A module and random variables of its shapes (traced, not initialized: no compilation):
  kernels at He scale, and biases, BatchNorm scales and running statistics far from init's
  zeros and ones, so that every variable shows in the outputs."""
  config = default.get_config().model
  config.update(overrides)
  module = model_lib.build_model(config)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name, shape = str(path[-1].key), leaf.shape
    if name == 'kernel':
      return rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))
    if name in ('var', 'scale'):
      return np.exp(0.5 * rng.normal(size=shape))
    return 0.3 * rng.normal(size=shape)  # bias, mean

  variables = jax.tree_util.tree_map_with_path(
      lambda path, leaf: value(path, leaf).astype(np.float32), shapes)
  return module, variables


@pytest.fixture(scope='module')
def members():
  """Two architectures: the tutorial's CNN, and a narrower BatchNorm one with dropout (which
  inference leaves out)."""
  return [_member(0), _member(1, batch_norm=True, conv_features=(16, 32, 32), dense_features=64,
                              dropout_rate=0.5)]


@pytest.mark.parametrize('which', ['both', 'plain', 'batch_norm', 'standardized'])
def test_onnx_graph_computes_the_jax_function(ort, members, images, tmp_path, which):
  # 'standardized': the speedrun's model, its pixels standardized by model.input_norm first.
  standardized = lambda: [_member(2, conv_features=(16, 24), kernel_sizes=(5, 3),
                                  pool_after=(0, 1), dense_features=256,
                                  input_norm=(0.1307, 0.3081))]
  chosen = {'both': lambda: members, 'plain': lambda: members[:1],
            'batch_norm': lambda: members[1:], 'standardized': standardized}[which]()
  path = export.export_onnx(chosen, str(tmp_path / 'model.onnx'))
  want = np.asarray(jax.jit(export.probabilities_fn(chosen))(images))
  _max_difference(_onnx_probabilities(ort, path, images), want)


def test_onnx_refuses_variables_it_would_ignore(ort, members, tmp_path):
  module, variables = members[0]
  params = dict(variables['params'])
  params['extra'] = {'kernel': np.zeros((3, 3), np.float32)}
  with pytest.raises(ValueError, match='extra/kernel'):
    export.export_onnx([(module, {'params': params})], str(tmp_path / 'model.onnx'))
  with pytest.raises(ValueError, match='at least one'):
    export.export_onnx([], str(tmp_path / 'model.onnx'))


# ---------------------------------------------------------------------------------------------
# Where export writes (fast: refused before any checkpoint is read)


def test_export_refuses_outputs_it_must_not_write(ort, idx_dir, tfds_dir, tmp_path):
  config = small_config(idx_dir, tfds_dir)
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'file').write_text('mine')
  refused = {
      str(tmp_path / 'file'): 'is an existing file; export writes a folder',
      str(workdir / 'checkpoints'): 'which only training writes',
      str(workdir / 'checkpoints' / 'new'): 'which only training writes',
  }
  for output, message in refused.items():
    with pytest.raises(UserError, match=message) as e:
      modes.run_export(config, str(workdir), output)
    assert '\n' not in str(e.value)
  # A population's members keep their checkpoints in their own folders.
  population = small_config(idx_dir, tfds_dir, **{'sweep.grid': 'seed=0,1'})
  inside = workdir / 'members' / '01-seed=1' / 'checkpoints' / 'x'
  with pytest.raises(UserError, match=r"members/01-seed=1/checkpoints, which only training"):
    modes.run_export(population, str(workdir), str(inside))
  # A savedmodel/ that export did not write is not replaced; nor is a folder named model.onnx.
  (tmp_path / 'a' / 'savedmodel').mkdir(parents=True)
  (tmp_path / 'a' / 'savedmodel' / 'notes.txt').write_text('mine')
  with pytest.raises(UserError, match='exists and is not a SavedModel'):
    modes.run_export(config, str(workdir), str(tmp_path / 'a'))
  (tmp_path / 'b' / 'model.onnx').mkdir(parents=True)
  with pytest.raises(UserError, match='model.onnx is a folder'):
    modes.run_export(config, str(workdir), str(tmp_path / 'b'))
  # export replaces the folder whole: one holding anything else is refused, naming it.
  (tmp_path / 'c').mkdir()
  (tmp_path / 'c' / 'model.onnx').write_text('an earlier export')
  (tmp_path / 'c' / 'notes.txt').write_text('mine')
  with pytest.raises(UserError, match=r'c holds notes.txt, which export did not write; export '
                                      r'replaces the folder whole'):
    modes.run_export(config, str(workdir), str(tmp_path / 'c'))
  with pytest.raises(UserError, match=r'run holds checkpoints, which export did not write'):
    modes.run_export(config, str(workdir), str(workdir))  # the workdir itself
  # Nothing to export yet: an error before the default folder is made.
  with pytest.raises(UserError, match='no checkpoint in'):
    modes.run_export(config, str(workdir))
  assert sorted(os.listdir(workdir)) == ['checkpoints']


def test_a_folder_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
  path = tmp_path / 'savedmodel'
  path.mkdir()
  (path / 'old.pb').write_text('old')
  with workdir_lib.written_aside(str(path)) as tmp:
    os.mkdir(tmp)
    (tmp_path / os.path.basename(tmp) / 'new.pb').write_text('new')
    assert os.listdir(path) == ['old.pb']  # nothing is seen before the rename
  assert os.listdir(path) == ['new.pb']
  with pytest.raises(RuntimeError):
    with workdir_lib.written_aside(str(path)) as tmp:
      os.mkdir(tmp)
      raise RuntimeError('killed while writing')
  assert os.listdir(tmp_path) == ['savedmodel'] and os.listdir(path) == ['new.pb']


def test_the_export_folder_is_replaced_whole_and_dead_exports_leftovers_are_cleaned(tmp_path):
  folder = tmp_path / 'export'
  folder.mkdir()
  (folder / 'model.onnx').write_text('old')
  with workdir_lib.written_aside(str(folder)) as new:
    os.makedirs(new)
    (pathlib.Path(new) / 'model.onnx').write_text('new')
    assert (folder / 'model.onnx').read_text() == 'old'  # nothing is seen before the swap
  assert os.listdir(tmp_path) == ['export'] and (folder / 'model.onnx').read_text() == 'new'
  with pytest.raises(KeyboardInterrupt):
    with workdir_lib.written_aside(str(folder)) as new:
      os.makedirs(new)
      (pathlib.Path(new) / 'model.onnx').write_text('newer')
      raise KeyboardInterrupt  # a signal while writing
  assert os.listdir(tmp_path) == ['export'] and (folder / 'model.onnx').read_text() == 'new'
  # What exports that are gone left: a half-written new folder is removed, one of a live
  # process is not; a folder moved aside while replacing is put back where the folder is gone.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  dead_pid, live_pid = int(dead.stdout), os.getppid()
  (tmp_path / f'export.{dead_pid}.tmp').mkdir()
  (tmp_path / f'export.{live_pid}.tmp').mkdir()
  (tmp_path / f'other.{dead_pid}.tmp').mkdir()
  done = export.clean_leftovers(str(folder))
  assert done == [f'removed {tmp_path}/export.{dead_pid}.tmp, left by an export that was killed '
                  f'(pid {dead_pid})'], done
  assert sorted(os.listdir(tmp_path)) == ['export', f'export.{live_pid}.tmp',
                                          f'other.{dead_pid}.tmp']
  folder.rename(tmp_path / f'export.{dead_pid}.old')
  assert len(export.clean_leftovers(str(folder))) == 1
  assert (folder / 'model.onnx').read_text() == 'new'


# ---------------------------------------------------------------------------------------------
# Trained models, exported and run (slow)


@pytest.fixture(scope='module')
def trained(idx_dir, tfds_dir, tmp_path_factory):
  config = small_config(idx_dir, tfds_dir)
  workdir = str(tmp_path_factory.mktemp('export_run'))
  digitjax.train(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_launch_exports_a_run_that_tensorflow_and_onnxruntime_reproduce(
    ort, trained, images, tmp_path, processes):
  config, workdir = trained
  before = workdir_snapshot(workdir)
  proc = processes.run(launch_args(
      '--config=configs/default.py', f'--workdir={workdir}', '--mode=export',
      '--config.eval_batch_size=50'), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  folder = os.path.join(workdir, 'export')
  assert proc.stdout.splitlines() == [
      f'Wrote {folder}/savedmodel: TensorFlow SavedModel of checkpoint step 22 (best): uint8 '
      f'images (N, 28, 28) -> probabilities (N, 10)',
      f'Wrote {folder}/model.onnx: ONNX model of checkpoint step 22 (best): uint8 images '
      f'(N, 28, 28) -> probabilities (N, 10)']
  # (TensorFlow's import writes its notices to stderr, whatever TF_CPP_MIN_LOG_LEVEL says.)
  assert not [l for l in proc.stderr.splitlines() if l.startswith(('error', 'Traceback'))]
  # Nothing but the export folder changed in the workdir.
  assert workdir_snapshot(workdir, skip=('export',)) == before
  assert sorted(os.listdir(folder)) == ['model.onnx', 'savedmodel']
  test_images, _ = data.read_idx_split(config.data.manual_dir, 'test', 'mnist', False)
  sample = np.concatenate([test_images[..., 0], images])
  want = _digitjax_probabilities(config, workdir, sample)
  _check_both_files(pathlib.Path(folder), want, sample, tmp_path,
                    processes, ort, 'synthetic run')


@pytest.mark.slow
def test_launch_export_mistakes_are_one_line(ort, trained, tmp_path, processes):
  config, workdir = trained
  (tmp_path / 'taken').write_text('mine')
  for args, message in (
      (['--split=test'], 'error: --split applies to --mode=eval only'),
      ([f'--output={tmp_path / "taken"}'], f'error: --output={tmp_path / "taken"} is an '
                                           f'existing file; export writes a folder'),
      ([f'--output={workdir}/checkpoints/x'], f'error: --output={workdir}/checkpoints/x is '
                                              f'inside {workdir}/checkpoints')):
    proc = processes.run(launch_args('--config=configs/default.py', f'--workdir={workdir}',
                                     '--mode=export', *args), cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', 'x'))


@pytest.mark.slow
def test_a_read_only_output_is_one_line_and_leaves_nothing(ort, trained, tmp_path):
  config, workdir = trained
  (tmp_path / 'source' / 'out').mkdir(parents=True)
  ro = tmp_path / 'ro'
  ro.mkdir()
  bind = subprocess.run(['mount', '--bind', str(tmp_path / 'source'), str(ro)],
                        capture_output=True, text=True)
  if bind.returncode:  # skipped with the reason here, a failure under CI (root there)
    cannot_mount(bind.stderr.strip())
  try:
    subprocess.run(['mount', '-o', 'remount,ro,bind', str(ro)], check=True)
    for output in (ro / 'new', ro / 'out'):  # a folder to make, one to write into
      with pytest.raises(UserError, match='Read-only file system') as e:
        modes.run_export(config, workdir, str(output))
      assert '\n' not in str(e.value) and 'nothing was written' in str(e.value)
  finally:
    subprocess.run(['umount', str(ro)], check=True)
  assert os.listdir(tmp_path / 'source') == ['out'] and not os.listdir(tmp_path / 'source' / 'out')


@pytest.mark.slow
def test_a_population_selection_is_one_graph_of_the_mean(ort, idx_dir, tfds_dir, images,
                                                         tmp_path, processes):
  """Four members (two seeds, with and without BatchNorm), all selected: both files give the
  mean of their probabilities; one member alone exports as itself."""
  config = small_config(idx_dir, tfds_dir, **{
      'sweep.grid': 'seed=0,1', 'sweep.members': ('', 'model.batch_norm=True'),
      'sweep.select': 'ensemble'})
  workdir = str(tmp_path / 'population')
  results = digitjax.train(config, workdir)
  assert len(results['selected']) == 4
  test_images, _ = data.read_idx_split(config.data.manual_dir, 'test', 'mnist', False)
  sample = np.concatenate([test_images[..., 0], images])
  out = tmp_path / 'selection'
  assert modes.run_export(config, workdir, str(out)) == [str(out / 'savedmodel'),
                                                         str(out / 'model.onnx')]
  want = _digitjax_probabilities(config, workdir, sample)
  _check_both_files(out, want, sample, tmp_path, processes, ort, 'population selection')
  # The mean is not any one member's: the members really differ on these images.
  first = _digitjax_probabilities(config, workdir, sample, member='0')
  assert float(np.abs(first - want).max()) > 1e-3
  # --member: one BatchNorm member, as itself.
  assert modes.target(config, workdir, '3').members[0].config.model.batch_norm
  member = tmp_path / 'member'
  modes.run_export(config, workdir, str(member), member='3')
  want = _digitjax_probabilities(config, workdir, sample, member='3')
  _check_both_files(member, want, sample, tmp_path, processes, ort, 'BatchNorm member')
  assert not os.path.exists(os.path.join(workdir, 'export'))


@pytest.mark.slow
def test_export_on_the_10000_real_mnist_test_images(ort, mnist_dir, tmp_path_factory, tmp_path,
                                                    processes):
  """One short epoch on 6,000 real training digits, exported; both files against digitjax on
  every image of the real test split."""
  source = tmp_path_factory.mktemp('mnist_6000')
  for split, prefix, count in (('train', 'train', 6000), ('test', 't10k', None)):
    x, y = data.read_idx_split(str(mnist_dir), split, 'mnist')
    write_idx(source / f'{prefix}-images-idx3-ubyte.gz', x[:count, ..., 0])
    write_idx(source / f'{prefix}-labels-idx1-ubyte.gz', y[:count])
  config = small_config(source, tmp_path_factory.mktemp('tfds_mnist_6000'), batch_size=32,
                        learning_rate=0.01, eval_batch_size=1000)
  workdir = str(tmp_path_factory.mktemp('mnist_export_run'))
  results = digitjax.train(config, workdir)
  assert results['test_accuracy'] > 0.9, results
  modes.run_export(config, workdir)
  test_images, test_labels = data.read_idx_split(str(mnist_dir), 'test', 'mnist')
  assert len(test_images) == 10_000
  want = _digitjax_probabilities(config, workdir, test_images[..., 0])
  _check_both_files(pathlib.Path(workdir) / 'export', want, test_images[..., 0], tmp_path,
                    processes, ort, 'real MNIST')
  assert (want.argmax(-1) == test_labels).mean() == pytest.approx(results['test_accuracy'])
