"""The step-based loop of one group: members that train side by side, restored or initialized,
epoch by epoch, stopped cleanly by signals, each ending with its results.

A single run is a group of one member. A group's members share the loop's structure (batch
size, steps, model, schedule kind...); each has its own numbers (seed, learning rate...), files
(checkpoints, metrics, results), state and example order. The loop takes no config: each
member's recipe (plan.recipe: its step's spec and numbers, models, sizes) holds what it needs,
and its config is only written into its records. `execution`:
- 'map': member after member for each chunk of steps, each through its own compiled step, the
  very program its single run compiles (so each member is its single run, bit for bit);
- 'vmap': one program for all, the states stacked along a member axis (sharded over the mesh's
  'members' axis), the numbers that differ between members passed as arrays (steps.Hyper).
The loop is a handful of named steps over one run state (`Run`): `restore_or_init`,
`start_training` (the programs compiled), `train_epoch` (`begin_epoch`, `train_span`, then the
steps of `Run.after_epoch`: AFTER_EPOCH's check_divergence, stop_mid_epoch, evaluate_epoch,
checkpoint_epoch, stop_after_epoch) until the last step, and `finish`. A search adds its own
steps (exploit, refill) to `after_epoch`.
Members are saved side by side at the same steps; a resumed group restores the newest step that
every member can read, so a kill at any moment costs no member more than its last save.

Seconds: a member's epoch_seconds (metrics.jsonl) add up to its train_seconds (results.json),
across stops and resumes. Under 'map' both count the member's own steps; under 'vmap' the
members share one program, so each member's figures are the group's seconds (every member took
all of them: they are not shares, and do not add up across members).
A population's member diverges when its training loss becomes non-finite, or when its mean
training loss over an epoch exceeds EXPLODED_LOSS x log(num_classes); it stops there and the
others go on. Signals are checked between members wherever a phase visits them one by one.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from digitjax import checkpoint as ckpt_lib, configlib, data, inference, metrics as metrics_lib
from digitjax import model as model_lib, parallel, pipeline, signals, steps
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError
from digitjax.members import Member, Outcome
from digitjax.plan import Recipe
from digitjax.metrics import log


class NonFiniteLossError(UserError):
  pass


class Preempted(signals.Interrupted):
  """The run stopped on a signal after saving a checkpoint at `step`."""

  def __init__(self, signal_name: str, step: int):
    super().__init__(signal_name, f'at step {step}', saved=True)
    self.step = step


# ---------------------------------------------------------------------------------------------
# Signals


class StopSignals:
  """The loop's view of signals.py: SIGTERM/SIGINT ask it to stop after the current chunk."""

  def __enter__(self):
    signals.install()
    return self

  @property
  def received(self) -> str | None:
    return signals.received()

  def agreed(self, collective: bool = True) -> bool:
    """Whether this process, or with `collective` any process, got a signal (a collective:
    call it at the same step everywhere)."""
    if collective and parallel.any_process(self.received is not None):
      signals.note('a signal to another process')
    return self.received is not None

  def __exit__(self, *exc):
    signals.uninstall()


def _process_age() -> float | None:
  """Seconds since this process started (imports included), or None where unknown."""
  try:
    import psutil
    return time.time() - psutil.Process().create_time()
  except Exception:
    return None


def epoch_line(prefix: str, epoch: int, num_epochs: int, seconds: float, record: dict) -> str:
  val = lambda key: '-' if not math.isfinite(record[key]) else f'{record[key]:.4f}'
  return (f'{prefix}Epoch {epoch}/{num_epochs} - {seconds:.1f}s - loss: '
          f'{record["train_loss"]:.4f} - accuracy: {record["train_accuracy"]:.4f} - val_loss: '
          f'{val("val_loss")} - val_accuracy: {val("val_accuracy")}'
          + (f' - raw_val_accuracy: {val("raw_val_accuracy")}' if 'raw_val_accuracy' in record
             else ''))


# ---------------------------------------------------------------------------------------------
# The group


class _Group:
  """The members' states and compiled steps, one program each ('map') or one for all ('vmap')."""

  def __init__(self, members, recipes: list[Recipe], splits, mesh, searched=()):
    choices = recipes[0].choices
    self.members, self.recipes, self.mesh, self.choices = members, recipes, mesh, choices
    self.searched = tuple(searched)  # Hyper fields passed as arrays whatever their values
    # The group's devices all on 'data': where a member's own state lives to be evaluated and
    # saved (a vmapped group's mesh spreads members over 'members'; evaluating one member on it
    # would have every member slice compute the whole batch: 4x the work on v5e 2x2).
    self.flat = parallel.make_mesh(devices=list(mesh.devices.flat))
    self.spe = recipes[0].spec.steps_per_epoch
    self.vmapped = choices.execution == 'vmap' and len(members) > 1
    self.specs = [r.spec for r in recipes]
    self.hypers = [r.hyper for r in recipes]  # each member's numbers now (a search changes them)
    self.device_input = choices.input_pipeline == 'device'
    self.arrays = pipeline.place(splits.train, mesh) if self.device_input else splits.train

  # States

  def init(self) -> list:
    keys = [jax.random.key(r.seed) for r in self.recipes]
    if not self.vmapped:
      inits = {}  # one program per structure: the numbers do not shape the initial state
      for spec, hp in zip(self.specs, self.hypers):
        inits.setdefault(spec, jax.jit(functools.partial(steps.init_state, spec, hp)))
      states = []
      for spec, key in zip(self.specs, keys):
        signals.check("while initializing the members' states; nothing was lost")
        states.append(jax.device_put(inits[spec](key), parallel.replicated(self.flat)))
      return states
    # One vmapped init for all: each member gets the parameters its single run starts from
    # (the initializers are elementwise).
    init = jax.jit(jax.vmap(functools.partial(steps.init_state, self.specs[0], self.hypers[0])))
    stacked = init(jnp.stack(keys))
    return [jax.device_put(jax.tree.map(lambda x: x[i], stacked), parallel.replicated(self.flat))
            for i in range(len(self.members))]

  def abstract(self, state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=parallel.replicated(self.flat)), state)

  def carry(self, states: list):
    """The loop's carry: a list of member states, or one stacked state."""
    if not self.vmapped:
      return states
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return jax.device_put(stacked, parallel.member_sharding(self.mesh))

  def states(self, carry) -> list:
    """Each member's state, replicated on the mesh (for evaluation and checkpoints)."""
    if not self.vmapped:
      return carry
    return [jax.device_put(jax.tree.map(lambda x: x[i], carry), parallel.replicated(self.flat))
            for i in range(len(self.members))]

  def empty_sums(self):
    if not self.vmapped:
      return [jax.device_put(steps.empty_sums(), parallel.replicated(self.mesh))
              for _ in self.members]
    sums = jax.tree.map(lambda x: jnp.stack([x] * len(self.members)), steps.empty_sums())
    return jax.device_put(sums, parallel.member_sharding(self.mesh))

  def host_sums(self, sums) -> list[dict]:
    """Each member's running sums, fetched to the host."""
    host = jax.device_get(sums)
    if not self.vmapped:
      return host
    return [jax.tree.map(lambda x: x[i], host) for i in range(len(self.members))]

  def read_sums(self, sums) -> list[dict]:
    return [steps.read_sums(s) for s in self.host_sums(sums)]

  # Programs

  def make_inputs(self, batch_size: int, chunk_steps: int) -> list[tuple]:
    """(feeder, numbers) of each member ('map'), or of the group ('vmap').

    Numbers that differ between members are passed to the step as arrays. Under 'map', only
    those whose arithmetic stays exactly that of a Python number (EXACT_NUMBERS) are: members
    that differ in nothing else share one compiled step, and the others get their own (a
    single run's is all Python numbers: the program it always compiled to).
    """
    varying = [f for f in steps.Hyper._fields
               if f in self.searched or len({getattr(h, f) for h in self.hypers}) > 1]
    if self.vmapped:
      self.passed = varying
      template, spec = self.hypers[0], self.specs[0]

      def member_step(state, sums, batch, values):
        return steps.train_and_accumulate(state, sums, batch, template._replace(**values), spec)

      step_fn = lambda state, sums, batch, values: jax.vmap(member_step)(state, sums, batch,
                                                                         values)
      feed = pipeline.DeviceInput(self.arrays, batch_size, self.mesh, step_fn, chunk_steps,
                                  members=len(self.members))
      return self.with_numbers([feed])
    exact = steps.exact_numbers(self.specs[0])
    self.passed = [f for f in varying if f in exact or f in self.searched]
    programs, feeds = {}, []
    for spec, hp in zip(self.specs, self.hypers):
      key = (spec, hp._replace(**{f: None for f in self.passed}))
      if key not in programs:
        step_fn = functools.partial(_step_with_numbers, hp=hp, spec=spec)
        programs[key] = self._input(step_fn, batch_size, chunk_steps)
      feeds.append(programs[key])
    return self.with_numbers(feeds)

  def with_numbers(self, feeds: list) -> list[tuple]:
    """(feed, numbers) pairs: the passed numbers of the members' current hypers."""
    if self.vmapped:
      numbers = {f: jnp.asarray([getattr(h, f) for h in self.hypers], jnp.float32)
                 for f in self.passed}
      return [(feeds[0], jax.device_put(numbers, parallel.member_sharding(self.mesh)))]
    return [(feed, {f: jax.device_put(np.float32(getattr(hp, f)), parallel.replicated(self.mesh))
                    for f in self.passed}) for feed, hp in zip(feeds, self.hypers)]

  def member_state(self, carry, i: int):
    return carry[i] if not self.vmapped else jax.tree.map(lambda x: x[i], carry)

  def with_member_state(self, carry, i: int, state):
    """The carry with member i's state replaced by a copy of `state` (a member's own arrays:
    the step donates them)."""
    placed = jax.device_put(state, parallel.replicated(self.flat))  # on every process too
    if not self.vmapped:
      carry = list(carry)
      carry[i] = _copied(placed)
      return carry
    carry = jax.jit(lambda c, x: jax.tree.map(lambda a, b: a.at[i].set(b), c, x))(carry, placed)
    return jax.device_put(carry, parallel.member_sharding(self.mesh))

  def fresh_state(self, key):
    """A new member's initial state from `key` (the group's structure; compiled once)."""
    if getattr(self, '_init', None) is None:
      self._init = jax.jit(functools.partial(steps.init_state, self.specs[0], self.hypers[0]))
    return jax.device_put(self._init(key), parallel.replicated(self.flat))

  def _input(self, step_fn, batch_size, chunk_steps):
    if self.device_input:
      return pipeline.DeviceInput(self.arrays, batch_size, self.mesh, step_fn, chunk_steps)
    return pipeline.HostInput(self.arrays, batch_size, self.mesh, step_fn)

  def permutation(self, epoch: int, n: int):
    perms = [data.epoch_permutation(r.seed, epoch, n) for r in self.recipes]
    return jnp.stack(perms) if self.vmapped else perms

  def learning_rate(self, i: int, step: int) -> float:
    lr = steps.learning_rate_schedule(self.specs[i], self.hypers[i])
    return float(lr(step)) if callable(lr) else float(lr)


@jax.jit
def _copied(tree):
  """A copy of `tree`'s arrays in new buffers (a member's state is donated to its step)."""
  return jax.tree.map(jnp.copy, tree)


def _step_with_numbers(state, sums, batch, numbers, hp, spec):
  return steps.train_and_accumulate(state, sums, batch, hp._replace(**numbers), spec)


# ---------------------------------------------------------------------------------------------
# Restore


def _restore_common(checkpoints, targets, fields, active) -> tuple[list | None, list, int]:
  """(states, metas, step): every active member restored at the newest step all of them can
  read (damaged checkpoints are skipped and set aside); (None, [], 0) if they share none.

  Each member's newest checkpoint is first checked against its config's resume fields
  (`fields`), so that nothing is ever discarded from a workdir that belongs to another config.
  """
  for c, f, a in zip(checkpoints, fields, active):
    if a:
      ckpt_lib.check_newest_fits(c, f)
  on_disk = [set(c.steps()) for c, a in zip(checkpoints, active) if a]
  if not on_disk or not any(on_disk):
    return None, [], 0
  candidates = sorted(set.intersection(*on_disk), reverse=True)
  while candidates:
    states, metas, got = [], [], []
    for c, target, f, a in zip(checkpoints, targets, fields, active):
      signals.check('while restoring the checkpoints; nothing was lost')
      if not a:
        states.append(None), metas.append(None), got.append(None)
        continue
      state, meta, step = ckpt_lib.restore_newest(c, target, f, steps=candidates)
      if state is None:
        return None, [], 0
      states.append(state), metas.append(meta), got.append(step)
    reached = {s for s in got if s is not None}
    if len(reached) == 1:
      return states, metas, reached.pop()
    candidates = [s for s in candidates if s <= min(reached)]
  return None, [], 0


# ---------------------------------------------------------------------------------------------
# The run state


class Extension:
  """What a search adds to a group's loop (search_steps.py); this base adds nothing (a run, a
  grid). Its hooks, each a function of the run state:
  - `searched`: the Hyper fields passed to the step as arrays, so they change without
    recompiling;
  - `restored(run, metas)`: after restore or init (metas: the checkpoints' records, or None);
  - `next_boundary(run)`: the next step after run.step where `at_boundary` runs, or None;
  - `at_boundary(run)`: the search's step there (states and numbers may change), before the
    checkpoint saved at that step;
  - `meta(run)`: what every member's checkpoint records of the search (to resume it);
  - `results(run, i)`: what member i's results.json records of it."""
  searched: tuple = ()
  handles_divergence = False  # True: a diverged member is the search's to replace

  def restored(self, run: 'Run', metas: list | None) -> None:
    pass

  def next_boundary(self, run: 'Run') -> int | None:
    """The first boundary after run.step."""
    return None

  def at_boundary(self, run: 'Run') -> None:
    pass

  def meta(self, run: 'Run') -> dict:
    return {}

  def results(self, run: 'Run', i: int) -> dict:
    return {}

  def finish(self, run: 'Run') -> None:
    """At the end of training, before the members are tested."""


@dataclasses.dataclass(frozen=True)
class Part:
  """How a group takes part in its population. `process`: the one process that trains these
  members (a population split over processes); None: every process takes part (data
  parallelism). `collective`: whether signals are agreed between processes (they are when all
  processes run this group). `logits`: whether the outcomes carry validation logits (a
  population's selection needs them)."""
  process: int | None = None
  collective: bool = True
  logits: bool = True
  extension: Extension = Extension()


@dataclasses.dataclass
class _Epoch:
  """The epoch under way: its index, the step within it where it ends (the last epoch may be
  cut short), its progress bar, the step logs' last sums and each member's (or the vmapped
  group's) chunk iterator; `train`: each member's training figures once its steps are done."""
  index: int
  end: int
  progress: metrics_lib.Progress
  logged: list
  runs: list
  perms: Any = None
  train: list | None = None

  def last_step(self, spe: int) -> int:
    return self.index * spe + self.end


@dataclasses.dataclass
class Run:
  """One group's training, as every step of the loop sees it: what is fixed from the start
  (members, group, splits, signals, how the group takes part, the schedule's lengths) and what
  the steps advance (states, sums, step, clocks, checkpoints, writers, records, the diverged
  members). `after_epoch`: the steps run at each epoch's end, in order (a search adds its own:
  exploit, refill)."""
  members: list[Member]
  group: _Group
  splits: data.Splits
  stop: StopSignals
  part: Part
  spe: int                 # steps per epoch
  last_step: int
  num_epochs: int
  writes: bool             # whether this process writes the members' files
  named: bool              # a population's members (lines say '[name] '), not a run alone
  after_epoch: tuple = ()
  checkpoints: list = dataclasses.field(default_factory=list)
  step: int = 0
  states: list | None = None       # the restored (or initial) states, one per member
  active: list | None = None       # members that have not diverged in an earlier process
  diverged: dict = dataclasses.field(default_factory=dict)  # member index -> step
  clocks: _Clocks | None = None
  evaluator: Any = None
  writers: list = dataclasses.field(default_factory=list)
  inputs: list = dataclasses.field(default_factory=list)
  carry: Any = None
  sums: Any = None
  records: list | None = None      # each member's record of the last epoch
  epoch: _Epoch | None = None
  compile_seconds: float = 0.0
  first_step_seconds: float | None = None
  saved_step: int | None = None    # the step of the last save (a step is saved once)
  span_boundary: int | None = None  # the search's boundary the current span runs to

  @property
  def ext(self) -> Extension:
    return self.part.extension

  def prefix(self, member: Member) -> str:
    return f'[{member.name}] ' if self.named else ''


def _new_run(members, recipes: list[Recipe], splits, mesh, stop, part: Part) -> Run:
  spe = recipes[0].spec.steps_per_epoch
  last_step = configlib.total_steps(recipes[0].num_epochs, spe)
  writes = (parallel.is_main_process() if part.process is None
            else jax.process_index() == part.process)
  group = _Group(members, recipes, splits, mesh, part.extension.searched)
  return Run(members, group, splits, stop, part, spe,
             last_step, math.ceil(last_step / spe), writes,
             named=not members[0].alone, after_epoch=AFTER_EPOCH)


# ---------------------------------------------------------------------------------------------
# The loop


def train_group(members: list[Member], recipes: list[Recipe], splits: data.Splits, mesh,
                stop: StopSignals, part: Part = Part()) -> list[Outcome]:
  """Trains `members` (their `recipes`: plan.recipe, for this group's steps per epoch and
  choices) to the end of their schedule, resuming from their checkpoints, and evaluates each on
  the test split; writes each member's files. Returns their outcomes."""
  run = _new_run(members, recipes, splits, mesh, stop, part)
  try:
    restore_or_init(run)
    done = _already_done(run)
    if done is not None:
      return _report_done(run, done)
    start_training(run)
    while run.step < run.last_step:
      train_epoch(run)
    return finish(run)
  except BaseException:
    for c in run.checkpoints:  # a save in flight ends before the error is reported
      c.abandon()
    raise
  finally:
    for c in run.checkpoints:
      c.close()


def restore_or_init(run: Run) -> None:
  """Every member's checkpoints opened, and its state restored at the newest step all of them
  can read, or initialized."""
  for m, r in zip(run.members, run.group.recipes):  # a signal stops between two members
    signals.check("while opening the members' checkpoints; nothing was lost")
    run.checkpoints.append(ckpt_lib.Checkpoints(m.files.checkpoints, r.checkpoint_keep,
                                                process=run.part.process))
  finished = [_diverged_record(m) for m in run.members]
  run.active = [f is None for f in finished]
  run.diverged = {i: f['diverged_at_step'] for i, f in enumerate(finished) if f is not None}
  fresh = run.group.init()
  restored, metas, step = _restore_common(
      run.checkpoints, [run.group.abstract(s) for s in fresh],
      [r.resume for r in run.group.recipes], run.active)
  if restored is None:
    _start_over(run, fresh)
  else:
    _resume(run, [r if r is not None else f for r, f in zip(restored, fresh)], metas, step)
  run.saved_step = step if restored is not None else None
  run.ext.restored(run, metas if restored is not None else None)
  signals.check('while restoring the checkpoints; nothing was lost')


def _start_over(run: Run, fresh: list) -> None:
  run.states, run.clocks = fresh, _Clocks.start(len(run.members))
  for m, c, a in zip(run.members, run.checkpoints, run.active):
    if a:
      c.discard_after(0)
      if workdir_lib.read_jsonl(m.files.metrics):
        logging.warning('%s holds the metrics of an earlier run but no checkpoint to resume '
                        'from: training starts over from step 0, and its records are '
                        'replaced', m.files.dir)


def _resume(run: Run, states: list, metas: list, step: int) -> None:
  run.states, run.clocks, run.step = states, _Clocks.restore(metas), step
  for c, a in zip(run.checkpoints, run.active):
    if a:
      c.discard_after(step)
  if step < run.last_step:
    log(f'Resuming {"the group " if run.named else ""}from checkpoint at step {step} '
        f'(epoch {step // run.spe + 1}, step {step % run.spe} of it)')


def start_training(run: Run) -> None:
  """The evaluator, writers and step programs made, and the programs compiled."""
  group = run.group
  r = group.recipes[0]
  run.evaluator = inference.Evaluator(group.flat, r.eval_batch_size, r.eval_model)
  run.writers = [metrics_lib.MetricWriter(m.files, after_step=run.step, enabled=run.writes)
                 for m in run.members]
  run.inputs = group.make_inputs(r.batch_size, r.chunk_steps)
  run.carry = group.carry(run.states)
  run.sums = group.empty_sums()
  run.compile_seconds, programs = _compile(run.inputs, group, run.carry, run.sums)
  k = len(run.members)
  log(f'Compiled the train step in {run.compile_seconds:.1f}s on '
      f'{parallel.data_size(group.mesh)} {jax.default_backend()} device(s), '
      f'{group.choices.line()}'
      + (f'; {k} members, {group.choices.execution}, {programs} program(s)' if k > 1 else ''))


def train_epoch(run: Run) -> None:
  """One epoch (or what is left of it) in spans that end at the search's boundaries, each
  followed by the search's step and a checkpoint; then the epoch's end steps."""
  begin_epoch(run)
  while True:
    train_span(run)
    if run.step >= run.epoch.last_step(run.spe):
      break
    if run.step == run.span_boundary:
      boundary_mid_epoch(run)
    if run.stop.agreed(run.part.collective):  # the same answer on every process
      break
    start_span(run)
  for end_step in run.after_epoch:
    end_step(run)


def begin_epoch(run: Run) -> None:
  epoch = run.step // run.spe
  perms = run.group.permutation(epoch, len(run.splits.train['label']))
  end = min(run.spe, run.last_step - epoch * run.spe)
  progress = metrics_lib.Progress(end, f'Epoch {epoch + 1}/{run.num_epochs}')
  run.sums = run.group.empty_sums()
  run.epoch = _Epoch(epoch, end, progress, [None] * len(run.members), [], perms)
  start_span(run)


def start_span(run: Run) -> None:
  """Every member's chunk iterator from the run's step to the epoch's end or the search's next
  boundary, with the members' current numbers."""
  epoch, first = run.epoch, run.step % run.spe
  end = epoch.end
  boundary = run.span_boundary = run.ext.next_boundary(run)
  if boundary is not None and boundary < epoch.last_step(run.spe):
    end = boundary - epoch.index * run.spe
  if run.group.vmapped:
    feed, numbers = run.inputs[0]
    epoch.runs = [feed.run(run.carry, run.sums, epoch.perms, first, end, numbers)]
  else:
    epoch.runs = [feed.run(state, s, perm, first, end, numbers) for (feed, numbers), state, s, perm
                  in zip(run.inputs, run.carry, run.sums, epoch.perms)]


def train_span(run: Run) -> None:
  """Chunk after chunk to the span's end, or until a signal; the epoch's training figures."""
  while _train_chunk(run):
    if run.stop.agreed(run.part.collective):
      break
  run.epoch.progress.clear()
  run.epoch.train = run.group.read_sums(run.sums)


def boundary_mid_epoch(run: Run) -> None:
  """The search's step at a boundary inside an epoch, then a checkpoint there."""
  run.records = None
  run.ext.at_boundary(run)
  save(run, epoch_done=False)


def _train_chunk(run: Run) -> bool:
  """One chunk of every member; False if the epoch had no step left."""
  group, epoch = run.group, run.epoch
  results, elapsed = _run_chunk(group, epoch.runs, run.inputs, run.diverged)
  if all(r is None for r in results):
    return False
  done_in_epoch = max(r[2] for r in results if r is not None)
  run.carry, run.sums = _take_chunk(group, results, elapsed, run.carry, run.sums, run.clocks)
  run.step = epoch.index * run.spe + done_in_epoch
  if run.first_step_seconds is None:
    run.first_step_seconds = _process_age()
  if epoch.progress.due():
    epoch.progress.show(done_in_epoch, group.read_sums(run.sums)[0]['loss'])
  log_every = run.group.recipes[0].log_every_steps
  if log_every and run.writes and (run.step // log_every > (run.step - _chunk(run.inputs))
                                   // log_every or done_in_epoch == epoch.end):
    _log_steps(run)
  signals.reached('step', run.step)
  return True


# The steps at an epoch's end


def check_divergence(run: Run) -> None:
  """Marks the members whose training diverged this epoch (they stop, the others go on); a
  run's non-finite loss is an error."""
  if run.ext.handles_divergence:
    return
  for i, t in enumerate(run.epoch.train):
    found = None if i in run.diverged else _divergence(
        t, run.step, run.group.recipes[i].num_classes)
    if found is None:
      continue
    if not run.named:
      if t['first_nonfinite_step'] is None:
        continue  # a run's figures say what happened; only a non-finite loss stops it
      raise NonFiniteLossError(
          f'the training loss became non-finite at step {t["first_nonfinite_step"]}; '
          f'nothing after the last checkpoint ({run.checkpoints[i].steps()[-1:] or "none"}) '
          f'was saved; lower config.learning_rate')
    run.diverged[i] = found[0]
    _write_diverged(run.members[i], found, run.checkpoints[i], run.writes, run.clocks.total[i])


def stop_mid_epoch(run: Run) -> None:
  """A signal before the epoch's last step: a checkpoint, no evaluation, and the run stops."""
  if run.stop.received and run.step < run.epoch.last_step(run.spe):
    if run.saved_step != run.step:  # a boundary's checkpoint may have saved it already
      save(run, epoch_done=False)
    _stop_now(run)


def evaluate_epoch(run: Run) -> None:
  """Each member's record of the epoch (validation included), logged and written."""
  signals.reached('evaluating', run.step)
  member_states = run.group.states(run.carry)
  train, clocks = run.epoch.train, run.clocks
  run.records = [None] * len(run.members)
  for i, m in enumerate(run.members):
    if i in run.diverged:
      continue
    run.records[i] = {'epoch': run.epoch.index + 1, 'train_loss': train[i]['loss'],
                      'train_accuracy': train[i]['accuracy'],
                      **_evaluated(run, member_states[i], 'val'),
                      'epoch_seconds': clocks.epoch[i]}
    log(epoch_line(run.prefix(m), run.epoch.index + 1, run.num_epochs, clocks.epoch[i],
                   run.records[i]))
    run.writers[i].write(run.step, run.records[i])


def _evaluated(run: Run, state, split: str) -> dict:
  """'<split>_loss' and '<split>_accuracy' of the model a member delivers (its EMA, when it
  has one: steps.averaged), and then, with an EMA, the raw weights' as 'raw_<split>_...'."""
  examples = getattr(run.splits, split)
  delivered = run.evaluator.evaluate(steps.averaged(state), examples)
  figures = {f'{split}_loss': delivered['loss'], f'{split}_accuracy': delivered['accuracy']}
  if state.ema is not None:
    raw = run.evaluator.evaluate(state, examples)
    figures.update({f'raw_{split}_loss': raw['loss'], f'raw_{split}_accuracy': raw['accuracy']})
  return figures


def validation(run: Run) -> list[dict | None]:
  """Each member's validation figures at the run's step ({'loss': ..., 'accuracy': ...}; None
  for a diverged member): the epoch's records where the step ends an epoch, else evaluated."""
  if run.records is not None and run.step == run.epoch.last_step(run.spe):
    return [None if r is None else {'loss': r['val_loss'], 'accuracy': r['val_accuracy']}
            for r in run.records]
  member_states = run.group.states(run.carry)
  return [None if i in run.diverged else
          run.evaluator.evaluate(steps.averaged(member_states[i]), run.splits.val)
          for i in range(len(run.members))]


def search_at_epoch_end(run: Run) -> None:
  """The search's step where a boundary falls on the epoch's end (after its evaluation)."""
  if run.span_boundary == run.step:
    run.ext.at_boundary(run)


def checkpoint_epoch(run: Run) -> None:
  save(run, epoch_done=True)
  run.clocks.epoch = [0.0] * len(run.members)


def stop_after_epoch(run: Run) -> None:
  if run.stop.agreed(run.part.collective):  # at the epoch's last step or its evaluation
    _stop_now(run)


AFTER_EPOCH = (check_divergence, stop_mid_epoch, evaluate_epoch, search_at_epoch_end,
               checkpoint_epoch, stop_after_epoch)


def save(run: Run, epoch_done: bool) -> None:
  """Every member that goes on saved at the run's step (in orbax's threads)."""
  member_states = run.group.states(run.carry)
  for i, (m, c) in enumerate(zip(run.members, run.checkpoints)):
    if i in run.diverged:
      continue
    record = run.records[i] if run.records else None
    meta = {'step': run.step, 'epoch': run.step / run.spe,
            'train_seconds': run.clocks.total[i],
            'epoch_seconds': 0.0 if epoch_done else run.clocks.epoch[i],
            'resume_fields': run.group.recipes[i].resume,
            'config': m.config.to_dict(), **run.ext.meta(run)}
    c.save(run.step, member_states[i], meta,
           {'val_accuracy': record['val_accuracy']} if epoch_done and record else None)
    if run.part.process is None and jax.process_count() > 1 and len(run.members) > 1:
      c.wait()  # orbax's barriers between processes: one member's save at a time
  run.saved_step = run.step
  signals.reached('saving', run.step)  # the saves run in orbax's threads meanwhile


def _stop_now(run: Run):
  for c in run.checkpoints:
    c.wait()
  log(f'Stopped by {run.stop.received} at step {run.step}; checkpoint saved; run the same '
      f'command to resume')
  raise Preempted(run.stop.received, run.step)


def _diverged_record(member: Member) -> dict | None:
  results = workdir_lib.read_results(member.files.results)
  return results if results and results.get('diverged_at_step') is not None else None


def _already_done(run: Run) -> list[dict] | None:
  """Every member's results.json, if all of them describe the step the group has reached."""
  if run.step < run.last_step:
    return None
  records = []
  for m, a in zip(run.members, run.active):
    results = workdir_lib.read_results(m.files.results)
    if not results or (a and results.get('checkpoint_step') != run.step):
      return None
    records.append(results)
  return records


def _stop_between_members(run: Run, phase: str) -> None:
  """Raises Interrupted if a signal came (agreed between processes where they all take part):
  called between two members of a long per-member phase, so that it never goes deaf."""
  if run.stop.agreed(run.part.collective):
    raise signals.Interrupted(run.stop.received, phase)


def _report_done(run: Run, records: list[dict]) -> list[Outcome]:
  r = run.group.recipes[0]
  evaluator = inference.Evaluator(run.group.flat, r.eval_batch_size, r.eval_model)
  outcomes = []
  if run.part.logits:
    signals.reached('selecting')
  for m, r, state in zip(run.members, records, run.states):
    diverged = r.get('diverged_at_step') is not None
    log(f'{m.label}Already trained to step '
        f'{r["checkpoint_step"]}; results from {m.files.results}: '
        + ('diverged' if diverged else
           f'test_accuracy {r["test_accuracy"]:.4f}, test_loss {r["test_loss"]:.4f}'))
    if not run.part.logits:  # a run alone: its results are all there is to report
      outcomes.append(Outcome(m, r, [], state=state))
      continue
    _stop_between_members(run, "while evaluating the population's members; their results "
                          "are intact, and the population's are made next time")
    history = metrics_lib.read_history(m.files)
    val, test = (None, None) if diverged else _delivered_logits(evaluator, state, run.splits)
    outcomes.append(Outcome(m, r, history, val, test))
  return outcomes


def _delivered_logits(evaluator, state, splits, val: bool = True) -> tuple:
  """(validation logits, or None without `val`; test logits) of the model a member delivers:
  its EMA's weights when it keeps one (steps.averaged)."""
  delivered = steps.averaged(state)
  test = evaluator.logits(delivered, splits.test['image'])
  return (evaluator.logits(delivered, splits.val['image']) if val else None), test


@dataclasses.dataclass
class _Clocks:
  """Each member's training seconds: in all (results.json's train_seconds) and in the current
  epoch (metrics.jsonl's epoch_seconds), so that a member's epochs add up to its total. Under
  'map' they are the member's own chunks; under 'vmap' the members share one program, and
  each is given the group's seconds (every member took all of them)."""
  total: list[float]
  epoch: list[float]

  @classmethod
  def start(cls, k: int) -> '_Clocks':
    return cls([0.0] * k, [0.0] * k)

  @classmethod
  def restore(cls, metas) -> '_Clocks':
    """From the checkpoints' metadata: a mid-epoch checkpoint carries its epoch's seconds."""
    return cls([m['train_seconds'] if m else 0.0 for m in metas],
               [m.get('epoch_seconds', 0.0) if m else 0.0 for m in metas])

  def add(self, i: int, seconds: float) -> None:
    self.total[i] += seconds
    self.epoch[i] += seconds


def _run_chunk(group, runs, inputs, diverged) -> tuple[list, list[float]]:
  """One chunk (or, per step, `sync_every` steps) of every member, member after member:
  (each member's last (state, sums, steps done) or None, the seconds it took)."""
  results, elapsed = [], []
  for i, run in enumerate(runs):
    if not group.vmapped and i in diverged:
      results.append(None)
      elapsed.append(0.0)
      continue
    start = time.perf_counter()
    got = None
    for _ in range(inputs[i][0].sync_every):
      latest = next(run, None)
      if latest is None:
        break
      got = latest
    if got is not None:
      jax.block_until_ready(got[1])
    results.append(got)
    elapsed.append(time.perf_counter() - start)
  return results, elapsed


def _take_chunk(group, results, elapsed, carry, sums, clocks: _Clocks):
  """(carry, sums) after a chunk's results; each member's clocks advanced."""
  if group.vmapped:
    for i in range(len(group.members)):
      clocks.add(i, elapsed[0])
    return results[0][0], results[0][1]
  for i, r in enumerate(results):
    if r is not None:
      carry[i], sums[i] = r[0], r[1]
      clocks.add(i, elapsed[i])
  return carry, sums


def _compile(inputs, group, carry, sums) -> tuple[float, int]:
  """(seconds, programs): every distinct step program compiled."""
  signals.reached('compiling')
  start = time.perf_counter()
  compiled = set()
  for i, (feed, numbers) in enumerate(inputs):
    if id(feed) not in compiled:
      feed.compile(carry if group.vmapped else carry[i], sums if group.vmapped else sums[i],
                   numbers)
      compiled.add(id(feed))
  seconds = time.perf_counter() - start
  signals.check('while compiling the train step; nothing was lost')
  return seconds, len(compiled)


# A population's member has diverged when its mean training loss over an epoch's steps exceeds
# EXPLODED_LOSS x log(num_classes): log(num_classes) is the loss of a uniform guess (2.3 for
# 10 classes), and a mean 100 times that gives the right class a probability below e^-230 on
# average: the weights have blown up (a finite 4e19 at 9% accuracy was never flagged before).
EXPLODED_LOSS = 100


def _divergence(t: dict, step: int, num_classes: int) -> tuple[int, str] | None:
  """(step, reason) if the epoch's training sums `t` show a member diverged, else None."""
  if t['first_nonfinite_step'] is not None:
    return t['first_nonfinite_step'], 'non-finite loss'
  limit = EXPLODED_LOSS * math.log(num_classes)
  if t['loss'] > limit:
    return step, (f'mean training loss {t["loss"]:.3g} over the epoch, above '
                  f'{EXPLODED_LOSS} x log({num_classes}) = {limit:.0f}')
  return None


def _chunk(inputs) -> int:
  return getattr(inputs[0][0], 'chunk', inputs[0][0].sync_every)


def _log_steps(run: Run) -> None:
  """TensorBoard's training curve: loss and accuracy over the steps since the last log, and
  the learning rate, per member."""
  logged = run.epoch.logged
  for i, (writer, s) in enumerate(zip(run.writers, run.group.host_sums(run.sums))):
    if i in run.diverged:
      continue
    t = (int(s['steps']), float(s['loss']), float(s['accuracy']))
    before = logged[i] or (0, 0.0, 0.0)
    n = t[0] - before[0]
    if n > 0:
      writer.scalars(run.step, {'train/loss': (t[1] - before[1]) / n,
                                'train/accuracy': (t[2] - before[2]) / n,
                                'train/learning_rate': run.group.learning_rate(i, run.step)})
    logged[i] = t


def _write_diverged(member: Member, found: tuple[int, str], checkpoints, writes: bool,
                    train_seconds: float) -> None:
  at_step, reason = found
  saved = checkpoints.steps()
  what = ('the training loss became non-finite at step' if reason == 'non-finite loss' else
          f'the training loss exploded ({reason}) by step')
  log(f'[{member.name}] {what} {at_step}: this member stops here (its checkpoints: '
      f'{saved or "none"}); the others go on')
  if writes:
    workdir_lib.write_json_atomic(member.files.results, {
        'diverged_at_step': at_step, 'diverged_reason': reason,
        'checkpoint_step': saved[-1] if saved else None,
        'train_seconds': train_seconds, 'overrides': member.overrides,
        'config': member.config.to_dict()})


# ---------------------------------------------------------------------------------------------
# The end


def finish(run: Run) -> list[Outcome]:
  """Each member's test figures and results.json. A population's selection needs validation
  logits too; the signals are checked between its members (evaluating hundreds of them takes
  minutes)."""
  for c in run.checkpoints:
    c.wait()  # a failed last save is an error before results.json points at it
  run.ext.finish(run)
  outcomes = []
  member_states = run.group.states(run.carry)
  signals.reached('testing', run.step)
  if run.part.logits:
    signals.reached('selecting')
  for i, m in enumerate(run.members):
    if run.part.logits:
      _stop_between_members(run, "while evaluating the population's members; those "
                            "evaluated have their results, the others are evaluated next time")
    if i in run.diverged:
      outcomes.append(Outcome(m, workdir_lib.read_json(m.files.results) or {
          'diverged_at_step': run.diverged[i]}, metrics_lib.read_history(m.files)))
      run.writers[i].close()
      continue
    outcomes.append(_test_member(run, i, member_states[i]))
  return outcomes


def _test_member(run: Run, i: int, state) -> Outcome:
  """A member's test figures, written to its results.json and metrics."""
  m, splits, logits = run.members[i], run.splits, run.part.logits
  val_logits, test_logits = _delivered_logits(run.evaluator, state, splits, val=logits)
  test = inference.classification_metrics(test_logits, splits.test['label'])
  history = metrics_lib.read_history(m.files)
  raw = _raw_figures(run, state, history[-1] if history else {})
  results = _results(run, i, state, test, history[-1] if history else {}, raw)
  log(f'{run.prefix(m)}Test: loss {test["loss"]:.4f} - accuracy {test["accuracy"]:.4f} '
      f'({len(splits.test["label"])} images)'
      + (f'; raw weights (without the EMA): loss {raw["raw_test_loss"]:.4f} - accuracy '
         f'{raw["raw_test_accuracy"]:.4f}' if raw else ''))
  if run.writes:
    workdir_lib.write_json_atomic(m.files.results, results)
  run.writers[i].write(run.step, {'test_loss': test['loss'], 'test_accuracy': test['accuracy'],
                                  **{k: v for k, v in raw.items() if k.startswith('raw_test')}})
  run.writers[i].close()
  # A population's outcome carries no state: its members' logits are all the selection needs.
  return Outcome(m, results, history, val_logits, test_logits, None if logits else state)


def _raw_figures(run: Run, state, last: dict) -> dict:
  """With an EMA, the raw weights' test figures and last validation record ('raw_test_...',
  'raw_val_...'): the figures without the EMA's keys say what the delivered EMA scores. {}
  without an EMA."""
  if state.ema is None:
    return {}
  test = run.evaluator.evaluate(state, run.splits.test)
  return {'raw_test_accuracy': test['accuracy'], 'raw_test_loss': test['loss'],
          'raw_val_accuracy': last.get('raw_val_accuracy'),
          'raw_val_loss': last.get('raw_val_loss')}


def _results(run: Run, i: int, state, test: dict, last: dict, raw: dict) -> dict:
  """A member's results.json: its test figures, last validation record and costs (`raw`: the
  raw weights' figures beside an EMA's, _raw_figures)."""
  m, train_seconds = run.members[i], run.clocks.total[i]
  return {
      'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
      'val_accuracy': last.get('val_accuracy'), 'val_loss': last.get('val_loss'),
      **raw,
      'num_params': model_lib.count_params(state.params),
      'epochs_completed': round(run.step / run.spe, 4), 'checkpoint_step': run.step,
      'train_seconds': train_seconds,
      'seconds_per_epoch': train_seconds / max(run.step / run.spe, 1e-9),
      'compile_seconds': run.compile_seconds,
      'start_to_first_step_seconds': run.first_step_seconds,
      'devices': parallel.data_size(run.evaluator.mesh), 'backend': jax.default_backend(),
      **({'overrides': m.overrides} if m.overrides else {}),  # a config without a sweep: none
      'config': m.config.to_dict(), **run.ext.results(run, i),
  }
