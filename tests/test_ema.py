"""Weight averaging (config.ema_decay): the EMA follows its formula step by step, is saved and
resumed exactly, is the delivered model (results, eval, predict, export) beside the raw
weights' figures, works in populations, and changes nothing when it is off."""
import functools
import json
import os

import jax
import numpy as np
import pytest

import digitjax
from conftest import small_config
from digitjax import checkpoint as ckpt_lib, configlib, inference, members as members_lib
from digitjax import data, modes, parallel, signals, steps
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError


def _equal(a, b) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _batches(n: int, size: int = 8):
  rng = np.random.default_rng(0)
  return [{'image': rng.integers(0, 256, (size, 28, 28, 1), np.uint8),
           'label': rng.integers(0, 10, size).astype(np.int32)} for _ in range(n)]


def _numpy_ema(variables: list, decay: float) -> dict:
  """The EMA of a sequence of variables (the initial ones first), in float32 numpy:
  e_0 = v_0; after optimizer step k (0-based), d = min(decay, (1 + k) / (10 + k)) and
  e_{k+1} = (1 - d) * v_{k+1} + d * e_k."""
  ema = variables[0]
  for k, v in enumerate(variables[1:]):
    d = np.minimum(np.float32(decay), np.float32(1 + k) / np.float32(10 + k))
    ema = jax.tree.map(lambda new, old: (np.float32(1) - d) * new + d * old, v, ema)
  return ema


@pytest.mark.parametrize('decay, batch_norm', [(0.9, False), (0.05, True)])
def test_the_ema_follows_its_formula_over_real_jitted_steps(config, decay, batch_norm):
  # 0.9 stays in the warmup (1+k)/(10+k) over these steps; 0.05 is below it from the start.
  config.ema_decay, config.model.batch_norm = decay, batch_norm
  state, spec, hp = steps.create(config, jax.random.key(0))
  assert type(state) is (steps.BatchNormEMATrainState if batch_norm else steps.EMATrainState)
  step = jax.jit(functools.partial(steps.train_step, hp=hp, spec=spec))
  seen = [jax.device_get(state.variables())]
  assert _equal(jax.device_get(state.ema), seen[0])  # it starts at the initial variables
  for batch in _batches(6):
    state, _ = step(state, batch)
    seen.append(jax.device_get(state.variables()))
  assert set(seen[-1]) == ({'params', 'batch_stats'} if batch_norm else {'params'})
  expected = _numpy_ema(seen, decay)
  got = jax.device_get(state.ema)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  # It averages: strictly between the initial and the latest weights somewhere, equal to neither.
  kernel = lambda v: np.asarray(jax.tree.leaves(v['params'])[-1])
  assert not np.array_equal(kernel(got), kernel(seen[-1]))
  assert not np.array_equal(kernel(got), kernel(seen[0]))
  # The delivered view: the EMA's variables in the raw state's tree.
  view = steps.averaged(state)
  assert jax.tree.structure(view) == jax.tree.structure(state)
  assert _equal(view.variables(), state.ema)


def test_the_decay_warms_up_as_documented():
  at = lambda decay, step: float(steps.ema_decay_at(decay, step))
  assert at(0.999, 0) == pytest.approx(0.1) and at(0.999, 8) == pytest.approx(0.5)
  assert at(0.999, 80) == pytest.approx(0.9) and at(0.999, 10_000) == pytest.approx(0.999)
  assert at(0.05, 0) == pytest.approx(0.05)


def test_ema_decay_zero_changes_nothing(config):
  # The state's tree (so every checkpoint) is the one it always was.
  state, spec, hp = steps.create(config, jax.random.key(0))
  assert type(state) is steps.TrainState and state.ema is None
  assert not spec.ema and hp.ema_decay == 0.0
  assert steps.averaged(state) is state
  config.model.batch_norm = True
  assert type(steps.create(config, jax.random.key(0))[0]) is steps.BatchNormTrainState
  # An old workdir's stored config without the field gets the value that does what it did.
  record = config.to_dict()
  del record['ema_decay']
  assert configlib.with_added_fields(record)['ema_decay'] == 0.0


def test_the_restore_target_has_an_ema_as_the_checkpoint_says(config):
  """Whether the state keeps an EMA is structure (StepSpec.ema); the decay is a number
  (Hyper.ema_decay): a restore target takes the checkpoint's structure whatever the config's
  decay."""
  mesh = parallel.make_mesh()
  config.ema_decay = 0.9
  spec = steps.spec(config, None, 1)
  assert spec.ema and steps.hyper(config, 1).ema_decay == 0.9
  with_ema = inference.abstract_state(config, mesh)
  assert jax.tree.structure(inference.abstract_state(config, mesh, ema=True)) == \
      jax.tree.structure(with_ema)
  without = inference.abstract_state(config, mesh, ema=False)
  assert without.ema is None and with_ema.ema is not None
  config.ema_decay = 0.0
  assert jax.tree.structure(inference.abstract_state(config, mesh, ema=True)) == \
      jax.tree.structure(with_ema)
  assert jax.tree.structure(inference.abstract_state(config, mesh)) == jax.tree.structure(without)

def test_raw_training_is_unchanged_by_the_ema(config):
  # The EMA only watches: the raw weights after real jitted steps are bit for bit those of the
  # same steps without it.
  plain, spec0, hp = steps.create(config, jax.random.key(0))
  config.ema_decay = 0.99
  averaged, spec1, _ = steps.create(config, jax.random.key(0))
  step0 = jax.jit(functools.partial(steps.train_step, hp=hp, spec=spec0))
  step1 = jax.jit(functools.partial(steps.train_step, hp=hp, spec=spec1))
  for batch in _batches(3, 16):
    plain, m0 = step0(plain, batch)
    averaged, m1 = step1(averaged, batch)
    assert float(m0['loss']) == float(m1['loss'])
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain.params),
                                                  jax.tree.leaves(averaged.params)))


@pytest.mark.parametrize('value', [1.0, -0.1, float('nan'), 'high'])
def test_a_bad_decay_is_refused_in_one_line(config, value):
  config.ema_decay = 0.5
  record = config.to_dict()
  record['ema_decay'] = value
  import ml_collections
  with pytest.raises(UserError) as e:
    configlib.validate(ml_collections.ConfigDict(record))
  message = str(e.value)
  assert message.startswith(f'config.ema_decay={value!r} is invalid: it must be in [0, 1)')
  assert '\n' not in message and '0.999' in message


# ---------------------------------------------------------------------------------------------
# Runs: results, checkpoints, resume, eval


def _results(workdir) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def _restored(config, workdir, which='latest'):
  state, _, _ = inference.restore(config, workdir_lib.RunFiles.of(str(workdir)), which, 'eval',
                                  parallel.make_mesh())
  return jax.device_get(state)


@pytest.fixture(scope='module')
def ema_run(idx_dir, tfds_dir, tmp_path_factory):
  config = small_config(idx_dir, tfds_dir, num_epochs=2, ema_decay=0.9, chunk_steps=5)
  workdir = tmp_path_factory.mktemp('ema') / 'run'
  return config, workdir, digitjax.train(config, str(workdir))


def test_results_report_the_ema_and_the_raw_weights(ema_run, idx_dir, tfds_dir):
  config, workdir, results = ema_run
  assert results == _results(workdir)
  for key in ('test_accuracy', 'test_loss', 'val_accuracy', 'val_loss', 'raw_test_accuracy',
              'raw_test_loss', 'raw_val_accuracy', 'raw_val_loss'):
    assert isinstance(results[key], float), key
  assert results['test_loss'] != results['raw_test_loss']
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  epochs = [r for r in records if 'epoch' in r]
  assert [r['epoch'] for r in epochs] == [1, 2]
  assert all('raw_val_accuracy' in r and 'raw_val_loss' in r for r in epochs)
  assert results['val_loss'] == epochs[-1]['val_loss']
  assert results['raw_val_loss'] == epochs[-1]['raw_val_loss']
  # The figures are the EMA's (test_*) and the raw weights' (raw_test_*), recomputed here.
  state = _restored(config, workdir)
  assert ckpt_lib.has_ema(ckpt_lib.Checkpoints(str(workdir / 'checkpoints')).saved_shapes(44))
  splits = data.load_splits(config)
  evaluator = inference.Evaluator.for_config(config, parallel.make_mesh())
  ema = evaluator.evaluate(steps.averaged(state), splits.test)
  raw = evaluator.evaluate(state, splits.test)
  assert (ema['loss'], ema['accuracy']) == (results['test_loss'], results['test_accuracy'])
  assert (raw['loss'], raw['accuracy']) == (results['raw_test_loss'],
                                            results['raw_test_accuracy'])


def test_eval_and_the_other_modes_use_the_ema(ema_run):
  config, workdir, results = ema_run
  evaluated = modes.run_eval(config, str(workdir), 'latest', 'test')
  assert evaluated['test_loss'] == results['test_loss']
  assert evaluated['test_accuracy'] == results['test_accuracy']
  # The checkpoint decides, not the config given: a config without ema_decay still gets the EMA.
  plain = config.copy_and_resolve_references()
  plain.ema_decay = 0.0
  assert modes.run_eval(plain, str(workdir), 'latest', 'test')['test_loss'] == results['test_loss']
  # predict and export use Restored's states: the EMA's variables.
  goal = modes.target(plain, str(workdir))
  restored = modes.Restored(goal, 'latest', 'predict')
  state = _restored(config, workdir)
  assert _equal(jax.device_get(restored.states[0].variables()), state.ema)


def test_a_restore_reads_the_saved_shapes_once(ema_run, monkeypatch):
  """Whether the checkpoint keeps an EMA and whether its shapes fit come from one read of
  orbax's metadata."""
  config, workdir, _ = ema_run
  reads = []
  saved_shapes = ckpt_lib.Checkpoints.saved_shapes
  monkeypatch.setattr(ckpt_lib.Checkpoints, 'saved_shapes',
                      lambda self, step: reads.append(step) or saved_shapes(self, step))
  state = _restored(config, workdir)
  assert state.ema is not None and reads == [44]

def test_a_stopped_and_resumed_run_keeps_the_ema_bit_for_bit(ema_run, idx_dir, tfds_dir,
                                                             tmp_path, monkeypatch):
  config, straight, results = ema_run
  # A signal mid-way through the second epoch (steps 22-43): a checkpoint at the chunk's end.
  reached = signals.reached

  def stop_at_step_30(phase, step=None):
    if phase == 'step' and step is not None and step >= 30:
      signals.note('SIGTERM')
    reached(phase, step)

  monkeypatch.setattr(signals, 'reached', stop_at_step_30)
  workdir = tmp_path / 'stopped'
  with pytest.raises(signals.Interrupted):
    digitjax.train(config, str(workdir))
  monkeypatch.setattr(signals, 'reached', reached)
  saved = ckpt_lib.Checkpoints(str(workdir / 'checkpoints')).steps()
  assert saved[0] == 22 and 30 <= saved[1] < 44 and len(saved) == 2  # chunks of 5 from 22: 32
  mid = _restored(config, workdir, str(saved[1]))
  assert mid.ema is not None and int(mid.step) == saved[1]
  resumed = digitjax.train(config, str(workdir))
  assert _equal(_restored(config, workdir), _restored(config, straight))  # ema included
  for key in ('test_loss', 'raw_test_loss', 'val_loss', 'raw_val_loss'):
    assert resumed[key] == results[key], key


def test_an_ema_config_on_a_checkpoint_without_one_is_named(idx_dir, tfds_dir, tmp_path):
  plain = small_config(idx_dir, tfds_dir, num_epochs=0.25)
  workdir = str(tmp_path / 'plain')
  results = digitjax.train(plain, workdir)
  assert not any(k.startswith('raw_') for k in results)
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'metrics.jsonl', 'results.json',
                                         'tensorboard']
  longer = small_config(idx_dir, tfds_dir, num_epochs=0.5, ema_decay=0.9)
  with pytest.raises(ckpt_lib.CheckpointMismatch, match=r'array ema\.params\.\S+ is absent in '
                     r'the checkpoint .* \(config\.ema_decay: the checkpoint was trained '
                     r'without weight averaging\)'):
    digitjax.train(longer, workdir)


# ---------------------------------------------------------------------------------------------
# Populations


@pytest.mark.parametrize('execution', [pytest.param('map', marks=pytest.mark.slow), 'vmap'])
def test_population_members_keep_their_own_ema(idx_dir, tfds_dir, tmp_path, execution):
  config = small_config(idx_dir, tfds_dir, num_epochs=5 / 22, ema_decay=0.9, grad_chunks=1,
                        **{'sweep.grid': 'learning_rate=0.02,0.01', 'sweep.execution': execution})
  results = digitjax.train(config, str(tmp_path / 'pop'))
  members = members_lib.members_of(config, str(tmp_path / 'pop'))
  for m in members:
    r = _results(m.files.dir)
    assert 'raw_test_accuracy' in r and 'raw_val_loss' in r
    alone = small_config(idx_dir, tfds_dir, num_epochs=5 / 22, ema_decay=0.9, grad_chunks=1,
                         learning_rate=m.config.learning_rate)
    digitjax.train(alone, str(tmp_path / m.name))
    got, want = _restored(m.config, m.files.dir), _restored(alone, tmp_path / m.name)
    if execution == 'map':  # each member is its single run, bit for bit
      assert _equal(got, want)
    else:  # vmap rounds the batched products differently (test_population's tolerance)
      for a, b in zip(jax.tree.leaves(got.ema), jax.tree.leaves(want.ema)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  delivered = [r for r in results['members'] if r['selected']]
  assert delivered and delivered[0]['test_accuracy'] == _results(
      [m.files.dir for m in members if m.name == delivered[0]['name']][0])['test_accuracy']
