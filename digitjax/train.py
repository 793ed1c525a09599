"""Training: the state, the jitted steps, and the step-based loop of `train_and_evaluate`."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from digitjax import augment as augment_lib, checkpoint as ckpt_lib
from digitjax import configlib, data, ensemble, metrics as metrics_lib, model as model_lib
from digitjax import parallel, pipeline
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError
from digitjax.metrics import log


class NonFiniteLossError(UserError):
  pass


# ---------------------------------------------------------------------------------------------
# State and steps


class TrainState(train_state.TrainState):
  """flax's TrainState plus the run's PRNG key: step k draws from fold_in(rng, k), so dropout
  and augmentation depend only on (seed, step) and a resumed run repeats them exactly."""
  rng: jax.Array
  batch_stats = None  # a class attribute: no field, so no change to the checkpointed tree

  def variables(self, params=None) -> dict:
    """The module's variables for apply: `params` (default: the state's) and any statistics."""
    variables = {'params': self.params if params is None else params}
    if self.batch_stats is not None:
      variables['batch_stats'] = self.batch_stats
    return variables


class BatchNormTrainState(TrainState):
  """The state of a model with BatchNorm: also its running statistics ('batch_stats'). A
  subclass, so that the state of a model without, and its checkpoints, stay as they were."""
  batch_stats: Any


def total_steps(config, steps_per_epoch: int) -> int:
  """Training steps of the run: num_epochs may be fractional (the last epoch is then partial)."""
  return int(round(config.num_epochs * steps_per_epoch))


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.ScalarOrSchedule:
  """config.schedule: 'constant' (the tutorial's), 'cosine' or 'onecycle'; optional warmup."""
  total = max(total_steps(config, steps_per_epoch), 1)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  lr = config.learning_rate
  if config.schedule == 'onecycle':
    return optax.cosine_onecycle_schedule(total, lr, pct_start=config.onecycle_pct_start)
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), total)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  return lr  # a plain float: exactly optax.sgd(0.01, momentum=0.9), as in the tutorial


def make_optimizer(config, steps_per_epoch: int = 1) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum (the tutorial's), optionally with weight decay and Keras's plateau rule."""
  tx = optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum,
                 nesterov=config.nesterov)
  if config.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  if config.plateau.enabled:
    # Watches the training loss averaged over each epoch (the `value` every step passes).
    tx = optax.chain(tx, optax.contrib.reduce_on_plateau(
        factor=config.plateau.factor, patience=config.plateau.patience,
        cooldown=config.plateau.cooldown, accumulation_size=steps_per_epoch))
  return optax.with_extra_args_support(tx)


def create_train_state(config, rng, steps_per_epoch: int = 1, in_scan: bool = False) -> TrainState:
  """Parameters from `rng`; `steps_per_epoch` sizes the learning-rate schedule; `in_scan` says
  the step will run inside lax.scan (model_lib.build_model picks the layers for that).

  Jitted: run eagerly, the initializers compile op by op (~4 s of start-up on this CPU).
  """
  model = model_lib.build_model(config.model, in_scan=in_scan)
  tx = make_optimizer(config, steps_per_epoch)

  def init(rng):
    variables = model.init(rng, jnp.zeros((1,) + data.IMAGE_SHAPE, jnp.float32))
    stats = {'batch_stats': variables['batch_stats']} if 'batch_stats' in variables else {}
    return (BatchNormTrainState if stats else TrainState).create(
        apply_fn=model.apply, params=variables['params'], tx=tx,
        rng=jax.random.key_data(jax.random.fold_in(rng, 0x5eed)), **stats)

  return jax.jit(init)(rng)


def augment_ranges(config) -> augment_lib.AffineRanges | None:
  a = config.augment
  return augment_lib.AffineRanges(a.rotation, a.zoom, a.shift) if a.enabled else None


def _images(batch):
  """uint8 pixels travel to the device; [0, 1] floats are made there."""
  return batch['image'].astype(jnp.float32) / 255.0


def train_step(state, batch, augment: augment_lib.AffineRanges | None = None,
               grad_chunks: int = 1):
  """One SGD step on a batch: pure, (state, batch) -> (state, metrics).

  `augment` (static) applies random affine transforms on device before the forward pass.
  `grad_chunks` (static) computes the batch's gradient as the sum of the gradients of that many
  equal sub-batches: the same mathematics (mean loss over the batch), rounded differently. The
  sub-batches are independent computations that XLA:CPU runs on different cores at once.
  A model with BatchNorm normalizes by the whole batch's statistics, so it takes one chunk.
  """
  if grad_chunks > 1 and state.batch_stats is not None:
    raise ValueError('BatchNorm normalizes by the whole batch: grad_chunks must be 1')
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = _images(batch)
  if augment is not None:
    images = augment_lib.random_affine(jax.random.fold_in(key, 0), images, augment)
  labels = batch['label']
  dropout_key = jax.random.fold_in(key, 1)

  def loss_fn(params, images, labels, dropout_key):
    logits, updated = state.apply_fn(state.variables(params), images, train=True,
                                     rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    loss_sum = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
    return loss_sum, (loss_sum, jnp.sum(jnp.argmax(logits, -1) == labels),
                      updated.get('batch_stats'))

  # One chunk keeps the step's own dropout key; chunk c of several draws from fold_in(key, c).
  parts = [jax.grad(loss_fn, has_aux=True)(
               state.params, x, y,
               dropout_key if grad_chunks == 1 else jax.random.fold_in(dropout_key, c))
           for c, (x, y) in enumerate(zip(jnp.split(images, grad_chunks),
                                          jnp.split(labels, grad_chunks)))]
  n = labels.shape[0]
  grads = jax.tree.map(lambda *g: sum(g) / n, *(g for g, _ in parts))
  metrics = {'loss': sum(aux[0] for _, aux in parts) / n,
             'accuracy': sum(aux[1] for _, aux in parts) / n}
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                       value=metrics['loss'])
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)
  _, (_, _, new_stats) = parts[0]  # BatchNorm's running statistics (one chunk), or None
  if new_stats is not None:
    state = state.replace(batch_stats=new_stats)
  return state, metrics


def resolve_grad_chunks(config, mesh) -> int:
  """config.grad_chunks; 0 ('auto') = 2 on a single CPU device, where the two halves keep both
  cores busy (benchmarks/layers.py: ~8% faster steps at batch 32), else 1: accelerators are
  already parallel within each op, a split of a batch sharded over devices would reshard it, a
  vmapped ensemble's matmuls are already K times larger, and BatchNorm needs the whole batch."""
  if config.grad_chunks:
    return config.grad_chunks
  return 2 if (jax.default_backend() == 'cpu' and mesh.size == 1 and config.ensemble_size == 1
               and config.batch_size % 2 == 0 and not config.model.batch_norm) else 1


def eval_step(state, batch, apply_fn=None):
  """Logits of a batch; loss and accuracy are computed from them (see `evaluate`). `apply_fn`
  (default: the state's own) may be another formulation of the same model, with the same
  parameters: see `Evaluator.for_config`."""
  return (apply_fn or state.apply_fn)(state.variables(), _images(batch))


def _empty_sums(ensemble_size: int = 1):
  """Zeroed running sums of the step's metrics; one set per member of an ensemble."""
  sums = {'loss': jnp.zeros(()), 'accuracy': jnp.zeros(()), 'steps': jnp.zeros((), jnp.int32),
          'first_nonfinite_step': jnp.full((), jnp.iinfo(jnp.int32).max, jnp.int32)}
  return sums if ensemble_size == 1 else ensemble.stack([sums] * ensemble_size)


def _train_and_accumulate(state, sums, batch, augment=None, grad_chunks=1):
  """train_step plus running sums of its metrics, kept on device until they are logged."""
  step = state.step
  state, m = train_step(state, batch, augment, grad_chunks)
  bad = ~jnp.isfinite(m['loss'])
  sums = {'loss': sums['loss'] + m['loss'], 'accuracy': sums['accuracy'] + m['accuracy'],
          'steps': sums['steps'] + 1,
          'first_nonfinite_step': jnp.where(bad, jnp.minimum(sums['first_nonfinite_step'], step),
                                            sums['first_nonfinite_step'])}
  return state, sums


def _read_sums(sums) -> dict:
  """Means over the steps so far. An ensemble's are also averaged over its members, and its
  first non-finite step is the earliest of any member's."""
  sums = jax.device_get(sums)
  n = np.maximum(sums['steps'], 1)
  first_bad = int(np.min(sums['first_nonfinite_step']))
  mean = lambda total: float(np.mean(np.asarray(total, np.float64) / n))
  return {'loss': mean(sums['loss']), 'accuracy': mean(sums['accuracy']),
          'first_nonfinite_step': None if first_bad == np.iinfo(np.int32).max else first_bad}


# ---------------------------------------------------------------------------------------------
# Evaluation


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  if not len(labels):  # an empty split (validation_fraction=0): nothing to measure
    return {'loss': float('nan'), 'accuracy': float('nan')}
  logp = metrics_lib.log_softmax64(logits)
  return {'loss': float(-logp[np.arange(len(labels)), labels].mean()),
          'accuracy': float((logits.argmax(-1) == labels).mean())}


def evaluation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
  """classification_metrics of a model's (N, C) logits. Of an ensemble's (K, N, C), those of the
  mean probabilities (ensemble.combine_logits), with each member's under 'members'."""
  if logits.ndim == 2:
    return classification_metrics(logits, labels)
  return {**classification_metrics(ensemble.combine_logits(logits), labels),
          'members': [classification_metrics(member, labels) for member in logits]}


class Evaluator:
  """Logits for a whole split in fixed-size padded batches: one compiled program for all splits.

  With `ensemble_size` K > 1 the state is stacked and the logits are (K, N, C): the members are
  evaluated one after another by the single model's program. (Vmapped, XLA:CPU runs their
  convolutions as grouped ones: 3 members on 10,000 images took 9.8 s that way against 0.71 s
  one by one; benchmarks/layers.py --inference.)
  """

  def __init__(self, mesh, batch_size: int, ensemble_size: int = 1, apply_fn=None):
    parallel.check_divisible('eval_batch_size', batch_size, mesh)
    self.mesh, self.batch_size, self.ensemble_size = mesh, batch_size, ensemble_size
    self._sharding = parallel.batch_sharding(mesh)
    self._step = jax.jit(functools.partial(eval_step, apply_fn=apply_fn),
                         out_shardings=parallel.replicated(mesh))

  @classmethod
  def for_config(cls, config, mesh) -> 'Evaluator':
    """The evaluator of a run: config's eval batch and ensemble size, and the model's inference
    formulation (model_lib.build_model(inference=True)), whatever the training step runs."""
    return cls(mesh, config.eval_batch_size, config.ensemble_size,
               apply_fn=model_lib.build_model(config.model, inference=True).apply)

  def logits(self, state, images: np.ndarray) -> np.ndarray:
    if self.ensemble_size == 1:
      return self._model_logits(state, images)
    return np.stack([self._model_logits(ensemble.member(state, i), images)
                     for i in range(self.ensemble_size)])

  def _model_logits(self, state, images: np.ndarray) -> np.ndarray:
    n, b = len(images), self.batch_size
    per_process = b // jax.process_count()
    outputs = []
    for start in range(0, n, b):
      chunk = images[start:start + b]
      if len(chunk) < b:
        chunk = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], chunk.dtype)])
      mine = chunk[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
      outputs.append(self._step(state, parallel.to_global({'image': mine}, self._sharding)))
    if not outputs:
      return np.zeros((0, 0), np.float32)
    return np.concatenate(jax.device_get(outputs), axis=0)[:n]

  def evaluate(self, state, split: dict[str, np.ndarray]) -> dict:
    return evaluation_metrics(self.logits(state, split['image']), split['label'])


# ---------------------------------------------------------------------------------------------
# The loop


class _StopSignals:
  """SIGTERM/SIGINT ask the loop to stop after the current step; a second signal is ignored."""

  def __init__(self):
    self.received = None

  def __enter__(self):
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no signal handling
        pass
    return self

  def _handle(self, signum, frame):
    if self.received is None:
      self.received = signal.Signals(signum).name
      logging.warning('%s received: stopping after this step and saving a checkpoint',
                      self.received)
    else:
      logging.warning('%s received again: still saving the checkpoint, please wait',
                      signal.Signals(signum).name)

  def agreed(self) -> bool:
    """Whether any process got a signal (a collective: call it at the same step everywhere)."""
    if parallel.any_process(self.received is not None):
      self.received = self.received or 'a signal to another process'
    return self.received is not None

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


class Preempted(Exception):
  """The run stopped on a signal after saving a checkpoint; launch.py exits non-zero."""


def _stop_for_signal(signal_name: str, step: int, checkpoints) -> None:
  checkpoints.wait()
  log(f'Stopped by {signal_name} at step {step}; checkpoint saved; run the same command to resume')
  raise Preempted(f'stopped by {signal_name} at step {step}; checkpoint saved')


def _process_age() -> float | None:
  """Seconds since this process started (imports included), or None where unknown."""
  try:
    import psutil
    return time.time() - psutil.Process().create_time()
  except Exception:
    return None


def write_json_atomic(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _epoch_line(epoch, num_epochs, seconds, record):
  return (f'Epoch {epoch}/{num_epochs} - {seconds:.1f}s - loss: {record["train_loss"]:.4f} - '
          f'accuracy: {record["train_accuracy"]:.4f} - val_loss: {record["val_loss"]:.4f} - '
          f'val_accuracy: {record["val_accuracy"]:.4f}')


def train_and_evaluate(config, workdir: str) -> train_state.TrainState:
  """Trains per config, checkpointing to and resuming from `workdir`; returns the final state.

  Writes workdir/metrics.jsonl, TensorBoard files, checkpoints/ and results.json. The workdir
  is locked for the run: a second run on it refuses to start.
  """
  configlib.validate(config)
  with (workdir_lib.claim(workdir, exclusive=parallel.is_main_process()),
        contextlib.ExitStack() as on_exit):
    return _train_and_evaluate(config, workdir, on_exit)


def _train_and_evaluate(config, workdir: str,
                        on_exit: contextlib.ExitStack) -> train_state.TrainState:
  os.makedirs(workdir, exist_ok=True)
  parallel.check_cpu_layout(config.distributed.allow_several_cpu_devices)
  mesh = parallel.make_mesh()
  parallel.check_divisible('batch_size', config.batch_size, mesh)

  splits = data.load_splits(config)
  n_train = len(splits.train['label'])
  steps_per_epoch = n_train // config.batch_size
  if steps_per_epoch == 0:
    raise UserError(f'batch_size={config.batch_size} exceeds the {n_train} training examples; '
                    f'lower config.batch_size')
  last_step = total_steps(config, steps_per_epoch)
  num_epochs = math.ceil(last_step / steps_per_epoch)  # the last one may be partial
  log(f'{config.dataset}: {n_train} train, {len(splits.val["label"])} validation, '
      f'{len(splits.test["label"])} test examples; {steps_per_epoch} steps of '
      f'{config.batch_size} per epoch')

  input_kind = pipeline.resolve(config.input_pipeline)
  in_scan = input_kind == 'device'
  model = model_lib.build_model(config.model, in_scan=in_scan)
  log(model_lib.summary_table(model))
  if config.ensemble_size > 1:
    log(f'Ensemble of {config.ensemble_size} members (seeds {config.seed}..'
        f'{config.seed + config.ensemble_size - 1}), trained at once by vmap')
  state = ensemble.init_state(
      lambda key: create_train_state(config, key, steps_per_epoch, in_scan), config)
  state = jax.device_put(state, parallel.replicated(mesh))
  num_params = model_lib.count_params(state.params) // config.ensemble_size  # of one model

  config_dict = config.to_dict()
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), config.checkpoint_keep)

  def abandon_on_error(exc_type, *_):  # a save in flight ends before the error is reported
    if exc_type is not None:
      checkpoints.abandon()

  on_exit.push(abandon_on_error)
  restored, meta, step = checkpoints.restore_newest(state, config_dict)
  if restored is None:
    step, train_seconds = 0, 0.0
  else:
    state, train_seconds = restored, meta['train_seconds']
    if step < last_step:
      log(f'Resuming from checkpoint at step {step} (epoch {step // steps_per_epoch + 1}, '
          f'step {step % steps_per_epoch} of it)')
    else:
      log(f'Checkpoint at step {step} has finished training ({last_step} steps)')

  results_path = os.path.join(workdir, 'results.json')
  if step >= last_step and os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
    if results.get('checkpoint_step') == step:
      log(f'Already trained to step {step}; results from {results_path}: '
          f'test_accuracy {results["test_accuracy"]:.4f}, test_loss {results["test_loss"]:.4f}')
      checkpoints.close()
      return state

  evaluator = Evaluator.for_config(config, mesh)
  writer = metrics_lib.MetricWriter(workdir)
  sums = jax.device_put(_empty_sums(config.ensemble_size), parallel.replicated(mesh))
  grad_chunks = resolve_grad_chunks(config, mesh)
  step_fn = functools.partial(_train_and_accumulate, augment=augment_ranges(config),
                              grad_chunks=grad_chunks)
  if config.ensemble_size > 1:  # the same step for every member of the stacked state
    step_fn = jax.vmap(step_fn)
  feeder = pipeline.make_input(config.input_pipeline, splits.train, config.batch_size, mesh,
                               step_fn, config.chunk_steps, config.ensemble_size)
  compile_seconds = feeder.compile(state, sums)
  log(f'Compiled the train step in {compile_seconds:.1f}s on {jax.device_count()} '
      f'{jax.default_backend()} device(s), {input_kind} input, {model.conv_impl} convolutions, '
      f'gradient in {grad_chunks} chunk(s)')

  def save(epoch_done: bool, record=None):
    meta = {'step': step, 'epoch': step / steps_per_epoch, 'train_seconds': train_seconds,
            'resume_fields': ckpt_lib.resume_fields(config_dict), 'config': config_dict}
    checkpoints.save(step, state, meta,
                     {'val_accuracy': record['val_accuracy']} if epoch_done and record else None)

  record, first_step_seconds = None, None
  with _StopSignals() as stop:
    while step < last_step:
      epoch = step // steps_per_epoch
      perm = ensemble.epoch_permutation(config, epoch, n_train)
      epoch_end = min(steps_per_epoch, last_step - epoch * steps_per_epoch)
      progress = metrics_lib.Progress(epoch_end, f'Epoch {epoch + 1}/{num_epochs}')
      sums = jax.device_put(_empty_sums(config.ensemble_size), parallel.replicated(mesh))
      epoch_start = time.perf_counter()
      for state, sums, done in feeder.run(state, sums, perm, step % steps_per_epoch, epoch_end):
        step = epoch * steps_per_epoch + done
        if first_step_seconds is None:  # one sync, to report start-up time honestly
          jax.block_until_ready(sums)
          first_step_seconds = _process_age()
        if progress.due():
          progress.show(done, _read_sums(sums)['loss'])
        if done % feeder.sync_every == 0 or done == epoch_end:
          # Run at most `sync_every` steps ahead: otherwise async dispatch queues the whole
          # epoch and a signal is seen only after it. Every process stops at the same step.
          jax.block_until_ready(sums)
          if stop.agreed():
            break
      train = _read_sums(sums)
      train_seconds += time.perf_counter() - epoch_start
      progress.clear()
      if train['first_nonfinite_step'] is not None:
        raise NonFiniteLossError(
            f'the training loss became non-finite at step {train["first_nonfinite_step"]}; '
            f'nothing after the last checkpoint ({checkpoints.steps()[-1:] or "none"}) was '
            f'saved; lower config.learning_rate')
      if stop.received and step < epoch * steps_per_epoch + epoch_end:  # mid-epoch: no evaluation
        save(epoch_done=False)
        _stop_for_signal(stop.received, step, checkpoints)
      val = evaluator.evaluate(state, splits.val)
      record = {'epoch': epoch + 1, 'train_loss': train['loss'],
                'train_accuracy': train['accuracy'], 'val_loss': val['loss'],
                'val_accuracy': val['accuracy'],
                'epoch_seconds': time.perf_counter() - epoch_start,
                **ensemble.member_summary('val', val)}
      log(_epoch_line(epoch + 1, num_epochs, record['epoch_seconds'], record)
          + ensemble.describe('val', record))
      writer.write(step, record)
      save(epoch_done=True, record=record)
      if stop.agreed():  # the signal came at the epoch's last step or during its evaluation
        _stop_for_signal(stop.received, step, checkpoints)

  checkpoints.wait()  # a failed last save is an error before results.json points at it
  test_logits = evaluator.logits(state, splits.test['image'])
  test = evaluation_metrics(test_logits, splits.test['label'])
  history = metrics_lib.read_history(workdir)
  results = {
      'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
      **ensemble.member_summary('test', test),
      'val_accuracy': history[-1]['val_accuracy'] if history else None,
      'val_loss': history[-1]['val_loss'] if history else None,
      'num_params': num_params, 'epochs_completed': round(step / steps_per_epoch, 4),
      'checkpoint_step': step, 'train_seconds': train_seconds,
      'seconds_per_epoch': train_seconds / max(step / steps_per_epoch, 1e-9),
      'compile_seconds': compile_seconds, 'start_to_first_step_seconds': first_step_seconds,
      'devices': jax.device_count(),
      'backend': jax.default_backend(), 'config': config_dict,
  }
  log(f'Test: loss {test["loss"]:.4f} - accuracy {test["accuracy"]:.4f} '
      f'({len(splits.test["label"])} images)' + ensemble.describe('test', results))
  if parallel.is_main_process():
    write_json_atomic(results_path, results)
  writer.write(step, {'test_loss': test['loss'], 'test_accuracy': test['accuracy'],
                      **ensemble.member_summary('test', test)})
  writer.close()
  if config.plots and parallel.is_main_process():
    from digitjax import report  # matplotlib is imported only when pictures are drawn
    report.draw_all(workdir, splits, ensemble.combine_logits(test_logits), history)
  checkpoints.wait()
  checkpoints.close()
  return state
