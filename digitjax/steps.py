"""The pure pieces of training: the state, the optimizer and its schedules, the steps.

`train_step(state, batch, hp, spec) -> (state, metrics)`: `spec` (a `StepSpec`, static) holds
the structure (the model, the schedule's kind and length, which transforms the optimizer
chains, augmentation on or off, gradient chunks, whether the state keeps an EMA); `hp` (a
`Hyper`) holds the numbers (learning rate, momentum, weight decay, warmup, augmentation ranges,
dropout rate, the EMA's decay). A single run's `hp` holds Python numbers, so its program is
the one the optimizer always compiled to; a vmapped group passes the numbers that differ
between its members as arrays with a member axis, so one program trains them all
(population.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from digitjax import augment as augment_lib, configlib, model as model_lib

IMAGE_SHAPE = (28, 28, 1)


class TrainState(struct.PyTreeNode):
  """step, params, optimizer state and the run's PRNG key: step k draws from fold_in(rng, k),
  so dropout and augmentation depend only on (seed, step) and a resumed run repeats them.

  The optimizer and the model live in the StepSpec, not here: the state is arrays only (the
  names and tree of flax's TrainState, so checkpoints of earlier versions restore).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  batch_stats = None  # a class attribute: no field, so no change to the checkpointed tree
  ema = None  # likewise: only a state with config.ema_decay > 0 holds one (EMATrainState)

  def variables(self, params=None) -> dict:
    """The module's variables for apply: `params` (default: the state's) and any statistics."""
    variables = {'params': self.params if params is None else params}
    if self.batch_stats is not None:
      variables['batch_stats'] = self.batch_stats
    return variables


class BatchNormTrainState(TrainState):
  """The state of a model with BatchNorm: also its running statistics ('batch_stats')."""
  batch_stats: Any


class EMATrainState(TrainState):
  """A state that also keeps the exponential moving average of its model's variables
  (config.ema_decay > 0): `ema` = {'params': ...}, updated by train_step (`_with_ema`)."""
  ema: Any


class BatchNormEMATrainState(BatchNormTrainState):
  """EMATrainState's BatchNorm twin: `ema` = {'params': ..., 'batch_stats': ...}. The running
  statistics are averaged with the weights (as timm's ModelEmaV2 averages every buffer): the
  raw statistics describe the raw weights' activations, not the average's, and recomputing
  statistics for the average would cost a pass over the data at each evaluation."""
  ema: Any


def averaged(state: TrainState) -> TrainState:
  """The model a run delivers: with an EMA, the state with the EMA's params (and batch_stats)
  in place of the raw ones (the same tree, so compiled evaluators are reused); else `state`."""
  if state.ema is None:
    return state
  state = state.replace(params=state.ema['params'])
  if 'batch_stats' in state.ema:
    state = state.replace(batch_stats=state.ema['batch_stats'])
  return state


# ---------------------------------------------------------------------------------------------
# Structure and numbers


class Hyper(NamedTuple):
  """The numbers of a step that members of a vmapped group may set differently: Python numbers
  for one model, or arrays (one entry per member) under vmap."""
  learning_rate: Any
  momentum: Any
  weight_decay: Any
  warmup_steps: Any
  onecycle_pct_start: Any
  rotation: Any
  zoom: Any
  shift: Any
  dropout_rate: Any
  label_smoothing: Any = 0.0
  elastic_alpha: Any = 0.0
  elastic_sigma: Any = 4.0
  stroke: Any = 0.0
  ema_decay: Any = 0.0          # the EMA's decay (used where spec.ema: the state has an EMA)


# The config field of each Hyper number (a search changes these between compiled calls).
HYPER_OF_FIELD = {'learning_rate': 'learning_rate', 'momentum': 'momentum',
                  'weight_decay': 'weight_decay', 'onecycle_pct_start': 'onecycle_pct_start',
                  'augment.rotation': 'rotation', 'augment.zoom': 'zoom', 'augment.shift': 'shift',
                  'model.dropout_rate': 'dropout_rate', 'label_smoothing': 'label_smoothing'}


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The structure of a training step (hashable: a static argument of jit)."""
  model: model_lib.CNN
  schedule: str                 # 'constant' | 'cosine' | 'onecycle'
  total_steps: int              # the schedule's length
  steps_per_epoch: int          # the plateau rule averages the loss over an epoch
  optimizer: str                # 'sgd' | 'adam'
  adam_betas: tuple             # (b1, b2) of 'adam'
  nesterov: bool
  weight_decay: bool            # whether the optimizer adds decayed weights at all
  warmup: bool                  # whether the constant schedule has a warmup at all
  plateau: tuple | None         # (factor, patience, cooldown) of the plateau rule, or None
  augment: bool
  grad_chunks: int
  ema: bool = False             # whether the state keeps an EMA (config.ema_decay > 0)
  elastic: bool = False         # elastic distortion at all (augment.elastic_alpha > 0)
  stroke: bool = False          # stroke-width changes at all (augment.stroke > 0)


def hyper(config, steps_per_epoch: int) -> Hyper:
  """The numbers of `config` as Python values."""
  a = config.augment
  return Hyper(learning_rate=config.learning_rate, momentum=config.momentum,
               weight_decay=config.weight_decay,
               warmup_steps=int(config.warmup_epochs * steps_per_epoch),
               onecycle_pct_start=config.onecycle_pct_start, rotation=a.rotation, zoom=a.zoom,
               shift=a.shift, dropout_rate=config.model.dropout_rate,
               label_smoothing=config.label_smoothing, elastic_alpha=a.elastic_alpha,
               elastic_sigma=a.elastic_sigma, stroke=a.stroke, ema_decay=config.ema_decay)


def spec(config, model, steps_per_epoch: int, grad_chunks: int = 1) -> StepSpec:
  p = config.plateau
  return StepSpec(
      model=model, schedule=config.schedule,
      total_steps=max(configlib.total_steps(config.num_epochs, steps_per_epoch), 1),
      steps_per_epoch=steps_per_epoch, optimizer=config.optimizer,
      adam_betas=(config.adam_b1, config.adam_b2), nesterov=config.nesterov,
      weight_decay=bool(config.weight_decay),
      warmup=config.schedule == 'constant' and config.warmup_epochs > 0,
      plateau=(p.factor, p.patience, p.cooldown) if p.enabled else None,
      augment=config.augment.enabled, grad_chunks=grad_chunks, ema=config.ema_decay > 0,
      elastic=config.augment.elastic_alpha > 0, stroke=config.augment.stroke > 0)


def exact_numbers(spec: StepSpec) -> tuple[str, ...]:
  """The numbers whose arithmetic is the same, bit for bit, passed to the step as arrays or
  compiled into it as Python numbers (checked in tests/test_steps.py): they multiply or add
  once (Adam's learning rate too: it scales Adam's update once; Adam ignores the momentum).
  Schedules, augmentation ranges and dropout rates do more with theirs, which XLA then rounds
  differently."""
  constant_rate = spec.schedule == 'constant' and not spec.warmup
  return ('momentum', 'weight_decay') + (('learning_rate',) if constant_rate else ())


def _static(*values) -> bool:
  return all(isinstance(v, (int, float)) for v in values)


# ---------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(spec: StepSpec, hp: Hyper) -> optax.ScalarOrSchedule:
  """config.schedule: 'constant' (the tutorial's), 'cosine' or 'onecycle'; optional warmup.

  With Python numbers these are optax's own schedules, exactly; with arrays (members of a
  vmapped group that differ in them) the same curves in array arithmetic (`_array_schedule`).
  """
  total, lr, warmup = spec.total_steps, hp.learning_rate, hp.warmup_steps
  if spec.schedule == 'constant' and not spec.warmup:
    return lr  # a number: exactly optax.sgd(0.01, momentum=0.9), as in the tutorial
  if not _static(lr, warmup, hp.onecycle_pct_start):
    return _array_schedule(spec, hp)
  if spec.schedule == 'onecycle':
    return optax.cosine_onecycle_schedule(total, lr, pct_start=hp.onecycle_pct_start)
  if spec.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), total)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                               optax.constant_schedule(lr)], [warmup])


def _array_schedule(spec: StepSpec, hp: Hyper):
  """optax's curves (linear warmup from 0, cosine decay to 0, one-cycle with optax's factors
  25 and 1e4) for array-valued peaks, warmups and one-cycle shares: equal to optax's up to
  float32 rounding (tests/test_steps.py)."""
  total = spec.total_steps
  lr = jnp.asarray(hp.learning_rate, jnp.float32)
  warmup = jnp.asarray(hp.warmup_steps, jnp.float32)

  def warmed(count, after):
    rising = lr * jnp.clip(count, 0, warmup) / jnp.maximum(warmup, 1.0)
    return jnp.where(count < warmup, rising, after)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    if spec.schedule == 'onecycle':
      peak_at = jnp.floor(jnp.asarray(hp.onecycle_pct_start, jnp.float32) * total)
      start, end = lr / 25.0, lr / 25.0 / 1e4
      rise = jnp.clip(count / jnp.maximum(peak_at, 1.0), 0, 1)
      fall = jnp.clip((count - peak_at) / jnp.maximum(total - peak_at, 1.0), 0, 1)
      cos_interp = lambda a, b, t: b + (a - b) / 2.0 * (jnp.cos(jnp.pi * t) + 1.0)
      return jnp.where(count < peak_at, cos_interp(start, lr, rise), cos_interp(lr, end, fall))
    if spec.schedule == 'cosine':
      decay = jnp.maximum(total - warmup, 1.0)
      t = jnp.minimum(count - warmup, decay)
      return warmed(count, lr * (0.5 * (1 + jnp.cos(jnp.pi * t / decay))))
    return warmed(count, lr)

  return schedule


def make_optimizer(spec: StepSpec, hp: Hyper) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum (the tutorial's) or Adam, optionally with weight decay and Keras's
  plateau rule.

  Built from `hp` inside the step, so its numbers may be a vmapped group's arrays; its state's
  tree depends on `spec` only.
  """
  if spec.optimizer == 'adam':  # optax's eps (1e-8, outside the square root) is PyTorch's too
    b1, b2 = spec.adam_betas
    tx = optax.adam(learning_rate_schedule(spec, hp), b1=b1, b2=b2)
  else:
    tx = optax.sgd(learning_rate_schedule(spec, hp), momentum=hp.momentum,
                   nesterov=spec.nesterov)
  if spec.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(hp.weight_decay), tx)
  if spec.plateau is not None:
    # Watches the training loss averaged over each epoch (the `value` every step passes).
    factor, patience, cooldown = spec.plateau
    tx = optax.chain(tx, optax.contrib.reduce_on_plateau(
        factor=factor, patience=patience, cooldown=cooldown,
        accumulation_size=spec.steps_per_epoch))
  return optax.with_extra_args_support(tx)


# ---------------------------------------------------------------------------------------------
# State


def init_state(spec: StepSpec, hp: Hyper, key) -> TrainState:
  """A fresh state from a PRNG key: parameters from `key`, the run's key derived from it.

  Jit it (run eagerly, the initializers compile op by op: ~4 s of start-up on this CPU);
  vmap it over keys for a group (the initializers are elementwise, so each member starts from
  the very parameters its single run starts from).
  """
  variables = spec.model.init(key, jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32))
  opt_state = make_optimizer(spec, hp).init(variables['params'])
  fields = dict(step=jnp.zeros((), jnp.int32), params=variables['params'], opt_state=opt_state,
                rng=jax.random.key_data(jax.random.fold_in(key, 0x5eed)))
  if spec.ema:  # the average starts at the initial variables (copies: donated apart)
    fields['ema'] = jax.tree.map(jnp.copy, dict(variables))
  if 'batch_stats' in variables:
    bn = BatchNormEMATrainState if 'ema' in fields else BatchNormTrainState
    return bn(batch_stats=variables['batch_stats'], **fields)
  return (EMATrainState if 'ema' in fields else TrainState)(**fields)


def create(config, key, conv_impl: str = 'lax', pool_impl: str = 'lax', steps_per_epoch: int = 1,
           grad_chunks: int = 1) -> tuple[TrainState, StepSpec, Hyper]:
  """(state, spec, hp) of `config`: a way into the pure functions for tests and notebooks,
  e.g. `jax.jit(functools.partial(train_step, hp=hp, spec=spec))(state, batch)`."""
  spec_ = spec(config, model_lib.build_model(config.model, conv_impl, pool_impl),
               steps_per_epoch, grad_chunks)
  hp = hyper(config, steps_per_epoch)
  return jax.jit(functools.partial(init_state, spec_, hp))(key), spec_, hp


def _images(batch):
  """uint8 pixels travel to the device; [0, 1] floats are made there."""
  return batch['image'].astype(jnp.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Steps


def augmented(key, images, hp: Hyper, spec: StepSpec):
  """The step's images after its augmentations, each switched on in `spec`: stroke width
  (fold_in(key, 3)), elastic distortion (key 2), then the random affine (key 0; dropout draws
  from key 1). One that is off draws nothing, so the others' keys stay those they always had."""
  if spec.stroke:
    images = augment_lib.random_stroke(jax.random.fold_in(key, 3), images, hp.stroke)
  if spec.elastic:
    images = augment_lib.random_elastic(jax.random.fold_in(key, 2), images, hp.elastic_alpha,
                                        hp.elastic_sigma)
  if spec.augment:
    images = augment_lib.random_affine(jax.random.fold_in(key, 0), images,
                                       augment_lib.AffineRanges(hp.rotation, hp.zoom, hp.shift))
  return images


def training_loss(logits, labels, label_smoothing):
  """Per-example cross-entropy against the labels smoothed by `label_smoothing` (optax's
  smooth_labels: 1 - s on the label, s / classes on every class). Evaluation's loss is always
  the plain one; a Python 0 is exactly the plain one here too (the tutorial's arithmetic)."""
  if _static(label_smoothing) and label_smoothing == 0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch, hp: Hyper, spec: StepSpec):
  """One SGD step on a batch: pure, (state, batch) -> (state, metrics).

  Augmentation on device before the forward pass (`augmented`). With
  `spec.grad_chunks` > 1, the batch's gradient is the sum of the gradients of that many equal
  sub-batches: the same mathematics (mean loss over the batch), rounded differently; the
  sub-batches are independent computations that XLA:CPU runs on different cores at once.
  """
  if spec.grad_chunks > 1 and state.batch_stats is not None:
    raise ValueError('BatchNorm normalizes by the whole batch: grad_chunks must be 1')
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = augmented(key, _images(batch), hp, spec)
  labels = batch['label']
  dropout_key = jax.random.fold_in(key, 1)

  def loss_fn(params, images, labels, dropout_key):
    logits, updated = spec.model.apply(state.variables(params), images, train=True,
                                       dropout_rate=hp.dropout_rate,
                                       rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    loss_sum = training_loss(logits, labels, hp.label_smoothing).sum()
    return loss_sum, (loss_sum, jnp.sum(jnp.argmax(logits, -1) == labels),
                      updated.get('batch_stats'))

  # One chunk keeps the step's own dropout key; chunk c of several draws from fold_in(key, c).
  chunks = spec.grad_chunks
  parts = [jax.grad(loss_fn, has_aux=True)(
               state.params, x, y, dropout_key if chunks == 1 else jax.random.fold_in(dropout_key, c))
           for c, (x, y) in enumerate(zip(jnp.split(images, chunks), jnp.split(labels, chunks)))]
  n = labels.shape[0]
  grads = jax.tree.map(lambda *g: sum(g) / n, *(g for g, _ in parts))
  metrics = {'loss': sum(aux[0] for _, aux in parts) / n,
             'accuracy': sum(aux[1] for _, aux in parts) / n}
  updates, opt_state = make_optimizer(spec, hp).update(grads, state.opt_state, state.params,
                                                       value=metrics['loss'])
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)
  _, (_, _, new_stats) = parts[0]  # BatchNorm's running statistics (one chunk), or None
  if new_stats is not None:
    state = state.replace(batch_stats=new_stats)
  if spec.ema:
    state = _with_ema(state, hp.ema_decay)
  return state, metrics


def ema_decay_at(decay: float, step):
  """The decay of the EMA update after optimizer step `step` (0-based, the step before it):
  min(decay, (1 + step) / (10 + step)), the warmup of TensorFlow's ExponentialMovingAverage
  (num_updates), so that early on the average follows the fast-moving weights instead of
  keeping the random initialization: 0.1 at step 0, 0.5 at step 8, 0.9 at step 80, 0.999 from
  step 8990 on."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def _with_ema(state: TrainState, decay: float) -> TrainState:
  """The state after an optimizer step (state.step already advanced) with its EMA moved
  towards the new variables: ema <- d * ema + (1 - d) * variables, d = ema_decay_at(step)."""
  d = ema_decay_at(decay, state.step - 1)
  return state.replace(ema=optax.incremental_update(state.variables(), state.ema, 1.0 - d))


def eval_step(state: TrainState, batch, model: model_lib.CNN):
  """Logits of a batch; loss and accuracy are computed from them on the host (inference.py).
  `model` may be another formulation of the trained one (same parameters): Evaluator's."""
  return model.apply(state.variables(), _images(batch))


# ---------------------------------------------------------------------------------------------
# Metrics kept on device between log points


def empty_sums():
  """Zeroed running sums of a step's metrics (one set per member: vmap or stack them)."""
  return {'loss': jnp.zeros(()), 'accuracy': jnp.zeros(()), 'steps': jnp.zeros((), jnp.int32),
          'first_nonfinite_step': jnp.full((), jnp.iinfo(jnp.int32).max, jnp.int32)}


def train_and_accumulate(state, sums, batch, hp: Hyper, spec: StepSpec):
  """train_step plus running sums of its metrics, kept on device until they are logged."""
  step = state.step
  state, m = train_step(state, batch, hp, spec)
  bad = ~jnp.isfinite(m['loss'])
  sums = {'loss': sums['loss'] + m['loss'], 'accuracy': sums['accuracy'] + m['accuracy'],
          'steps': sums['steps'] + 1,
          'first_nonfinite_step': jnp.where(bad, jnp.minimum(sums['first_nonfinite_step'], step),
                                            sums['first_nonfinite_step'])}
  return state, sums


def read_sums(sums) -> dict:
  """Means over the steps so far (fetched from the device: call it when logging)."""
  sums = jax.device_get(sums)
  n = max(int(sums['steps']), 1)
  first_bad = int(sums['first_nonfinite_step'])
  return {'loss': float(np.float64(sums['loss']) / n),
          'accuracy': float(np.float64(sums['accuracy']) / n),
          'first_nonfinite_step': None if first_bad == np.iinfo(np.int32).max else first_bad}
