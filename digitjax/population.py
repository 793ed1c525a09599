"""Experiments as populations: the members config.sweep declares (members.py), trained in groups,
compared side by side, and one delivered model chosen on validation.

A config without a sweep is a population of one member, the config itself: its run is exactly a
single run, in the workdir itself (members.Member.alone), with a run's files and lines.

Members that differ only in numbers (configlib.MEMBER_NUMERIC_FIELDS: seed, learning rate,
momentum, weight decay, warmup, augmentation ranges, dropout rate) form one group, trained
side by side by loop.train_group ('map' or 'vmap', configlib.resolve); members that differ in
structure (widths, BatchNorm, batch size, epochs, schedule kind...) form groups trained one
after another. With several processes, members are dealt out to them (member i to process
i mod P), each process training its own on its own devices: no communication between them
until the end, when process 0 combines the results.

Before any work, the config is turned once into a plan (plan.make: checked, its members built,
the population sized and refused, in one line, if this machine cannot hold it); from then on the
orchestrator and the rooms below take the plan's plain values, and each group's members their
recipes (plan.recipe), never the config again.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time

import jax
import numpy as np

from digitjax import configlib, data, inference, loop, members as members_lib
from digitjax import metrics as metrics_lib, model as model_lib, parallel, plan as plan_lib
from digitjax import search_steps, signals
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError
from digitjax.members import Outcome
from digitjax.metrics import log

# ---------------------------------------------------------------------------------------------
# Training


def train(config, workdir: str) -> dict:
  """Trains the population `config` declares in `workdir` (a single run without a sweep),
  resuming whatever was started; returns what results.json holds: for a population, the
  delivered model's figures and one record per member under 'members'
  (`pandas.DataFrame(results['members'])` tabulates them).
  """
  plan = plan_lib.make(config, workdir)  # everything checked before any work; the config once
  extension = search_steps.extension(plan.search, workdir)
  with signals.recorded(), workdir_lib.claim(workdir, exclusive=parallel.is_main_process()):
    return workdir_lib.as_json(_train(plan, workdir, extension))


def _check_not_old_variants(workdir: str) -> None:
  """Ensembles of variants were written as workdir/variant<i>/ by an earlier digitjax."""
  if os.path.isdir(os.path.join(workdir, 'variant0')):
    raise UserError(f'--workdir={workdir} holds ensembles of variants (variant0/, ...) written '
                    f'by an earlier digitjax; they are populations now (members/<i>-<overrides>/'
                    f'): train again in a new --workdir')


def _train(plan: plan_lib.Plan, workdir, extension: loop.Extension) -> dict:
  config, members = plan.config, plan.members
  parallel.check_cpu_layout(config.distributed.allow_several_cpu_devices)
  _check_not_old_variants(workdir)
  done = _check_workdir(workdir, plan)
  if done is not None:
    return done
  splits = data.load_splits(config, firsts=plan.plots)  # the pictures' first images too
  _check_sizes(members, splits)
  # With several processes, a population's members are dealt out to them (a run alone is data
  # parallel, and a search's slots, which exchange states, too); a run alone reports as a run
  # does (no validation logits, its state kept).
  shard = (jax.process_count() > 1 and not members[0].alone
           and not isinstance(extension, search_steps.Search))
  part = loop.Part(process=jax.process_index() if shard else None, collective=not shard,
                   logits=not members[0].alone, extension=extension)
  n_train = len(splits.train['label'])
  log(f'{config.dataset}: {n_train} train, {len(splits.val["label"])} validation, '
      f'{len(splits.test["label"])} test examples'
      + (f'; {n_train // config.batch_size} steps of {config.batch_size} per epoch'
         if len({m.config.batch_size for m in members}) == 1 else ''))
  if shard:
    log(f'{len(members)} members over {jax.process_count()} processes: each trains its own')
  mine = [m for m in members if not shard or m.index % jax.process_count() == part.process]
  _make_folders(plan, workdir, mine, shard)
  start = time.perf_counter()
  outcomes = _train_groups(mine, splits, part)
  seconds = time.perf_counter() - start
  if members[0].alone:  # its results.json is the run's own, written by the loop
    report = _pictures(plan.plots, outcomes, [0])
    if report:
      report.draw_all(members[0].files.plots, splits, outcomes[0].test_logits,
                      outcomes[0].history)
    return outcomes[0].results
  if shard:
    outcomes = _gather(outcomes, members, splits)
    if not parallel.is_main_process():
      return {}
  return summarize(plan, workdir, outcomes, splits, seconds)


def _make_folders(plan: plan_lib.Plan, workdir: str, mine, shard: bool) -> None:
  """The population's config.json (process 0), and the folder and config.json of each member
  `mine` (each process its own when they are dealt out, else process 0 all); a run alone has
  its workdir. A signal stops between two members."""
  if plan.members[0].alone:
    return
  if parallel.is_main_process():
    workdir_lib.write_json_atomic(workdir_lib.RunFiles.of(workdir).config, plan.record)
  if shard or parallel.is_main_process():
    for m in mine:
      signals.check("while making the members' folders; the folders made so far are complete")
      os.makedirs(m.files.dir, exist_ok=True)
      workdir_lib.write_json_atomic(m.files.config, {
          'config': m.config.to_dict(),
          'members': [{'index': m.index, 'name': m.name, 'overrides': m.overrides}]})


def _train_groups(mine, splits, part: loop.Part) -> list[Outcome]:
  """Each group of this process's members trained in turn."""
  outcomes = []
  with loop.StopSignals() as stop:
    groups = members_lib.groups_of(mine)
    for g, group in enumerate(groups):
      if not group[0].alone:
        log(f'Group {g + 1}/{len(groups)}: {len(group)} member(s): '
            f'{", ".join(m.name for m in group)}')
      outcomes += _train_group(group, splits, stop, part)
  return outcomes


def _train_group(group, splits, stop, part: loop.Part) -> list[Outcome]:
  cfg = group[0].config
  local = part.process is not None  # a process of its own: its own devices only
  mesh = parallel.make_mesh(local=local)
  parallel.check_divisible('batch_size', cfg.batch_size, mesh)
  choices = configlib.resolve(cfg, data_devices=parallel.data_size(mesh),
                              group_size=len(group))
  if choices.execution == 'vmap':  # never for a group of one (configlib.resolve)
    mesh = parallel.make_mesh(local=local, members=_member_axis(len(group), mesh))
    parallel.check_divisible('batch_size', cfg.batch_size, mesh)
  spe = len(splits.train['label']) // cfg.batch_size
  recipes = [plan_lib.recipe(m.config, spe, choices) for m in group]  # the loop's plain values
  log(model_lib.summary_table(model_lib.build_model(cfg.model)))
  return loop.train_group(group, recipes, splits, mesh, stop, part)


def _member_axis(group_size: int, mesh) -> int:
  """Devices along 'members' for a vmapped group: as many as divide both."""
  return math.gcd(group_size, mesh.devices.size)


def _check_sizes(members, splits) -> None:
  n_train = len(splits.train['label'])
  for m in members:
    spe = n_train // m.config.batch_size
    if spe == 0:
      raise UserError(f'{m.where}batch_size={m.config.batch_size} exceeds the {n_train} '
                      f'training examples; lower config.batch_size')
    if configlib.total_steps(m.config.num_epochs, spe) < 1:
      raise UserError(f'{m.where}num_epochs={m.config.num_epochs} is less than one step of '
                      f'{m.config.batch_size} examples ({spe} steps per epoch); raise '
                      f'config.num_epochs')


def _check_workdir(workdir: str, plan: plan_lib.Plan) -> dict | None:
  """A workdir that holds another run or population is an error, never a mix of two. Returns
  the results of a population trained to the end with this sweep, printed; None if there is
  more to do (a run alone: the loop reports its own results)."""
  files, members = workdir_lib.RunFiles.of(workdir), plan.members
  record = workdir_lib.read_json(files.config, 'population config')
  saved = None if record is None else [m.get('name') for m in record.get('members', [])]
  if members[0].alone:  # a run alone writes no population record
    if saved is not None and len(saved) > 1:
      raise UserError(f'--workdir={workdir} holds a population of {len(saved)} members; give '
                      f'its config.sweep, or use a new --workdir')
    return None
  if saved is None and os.path.isdir(files.checkpoints):
    raise UserError(f'--workdir={workdir} holds a single run (trained without config.sweep); '
                    f'train the population in a new --workdir')
  names = [m.name for m in members]
  if saved is not None and saved != names:
    differ = next((i for i, (a, b) in enumerate(zip(saved, names)) if a != b),
                  min(len(saved), len(names)))
    was = saved[differ] if differ < len(saved) else 'absent'
    now = names[differ] if differ < len(names) else 'absent'
    raise UserError(f'--workdir={workdir} holds another population ({len(saved)} members; '
                    f'member {differ} was {was}, now {now}); use a new --workdir, or the '
                    f'config it was trained with')
  if record is not None:  # before anything is written: the stored config stays as it was
    search_steps.check_same_search(record.get('config', {}).get('search'), plan.search.identity,
                                   f'--workdir={workdir} holds')
  return _finished_population(files, plan)


def _finished_population(files, plan: plan_lib.Plan) -> dict | None:
  members = plan.members
  results = workdir_lib.read_json(files.results, 'results file')
  if not results or 'members' not in results:
    return None
  steps = {}
  for m in members:
    r = workdir_lib.read_results(m.files.results)
    if r is None:
      return None
    steps[m.name] = r.get('checkpoint_step')
  if not isinstance(results['members'], list) or not all(
      isinstance(r, dict) and 'name' in r for r in results['members']) or not all(
      isinstance(results.get(k), (int, float)) for k in workdir_lib.RESULT_KEYS[:2]):
    return None  # damaged: summarized again from the members
  recorded = {r['name']: r.get('checkpoint_step') for r in results['members']}
  if recorded != steps or _sweep_record(results.get('config', {}).get('sweep')) != (
      _sweep_record(plan.sweep)):
    return None
  log(f'Population of {len(members)} members already trained; results from {files.results}:')
  log(table(results))
  return results


def _sweep_record(sweep) -> dict | None:
  """The fields of config.sweep that make the population (allow_large only lets it start)."""
  return {k: v for k, v in sweep.items() if k != 'allow_large'} if isinstance(
      sweep, dict) else sweep


def _gather(outcomes, members, splits) -> list[Outcome]:
  """Every member's outcome on every process: results from the shared workdir (the learning
  curves of this process's own members from their outcomes), logits by one all-gather (the only
  communication between the processes of a sharded population)."""
  from jax.experimental import multihost_utils
  parallel.barrier('digitjax:population-trained')
  per = -(-len(members) // jax.process_count())
  classes = configlib.DATASET_LABELS[members[0].config.dataset]
  shape = lambda split: (per, len(split['label']), classes)
  gathered = {}
  for name, split in (('val', splits.val), ('test', splits.test)):
    mine = np.zeros(shape(split), np.float32)
    for k, o in enumerate(outcomes):
      logits = getattr(o, f'{name}_logits')
      if logits is not None and logits.size:
        mine[k] = logits
    gathered[name] = np.asarray(multihost_utils.process_allgather(mine))  # (P, per, N, C)
  histories = {o.member.index: o.history for o in outcomes}  # this process's members'
  result = []
  for m in members:
    p, k = m.index % jax.process_count(), m.index // jax.process_count()
    r = workdir_lib.read_results(m.files.results) or {}
    history = histories.get(m.index)
    if history is None:  # trained by another process: its records are in the shared workdir
      history = metrics_lib.read_history(m.files)
    diverged = r.get('diverged_at_step') is not None
    result.append(Outcome(m, r, history, None if diverged else gathered['val'][p, k],
                          None if diverged else gathered['test'][p, k]))
  return result


# ---------------------------------------------------------------------------------------------
# Results


def _member_record(o: Outcome, selected: bool) -> dict:
  r, m = o.results, o.member
  best = max((h['val_accuracy'] for h in o.history
              if isinstance(h.get('val_accuracy'), float)), default=None)
  return {'index': m.index, 'name': m.name, 'overrides': m.overrides,
          'dir': os.path.relpath(m.files.dir, os.path.dirname(os.path.dirname(m.files.dir))),
          'best_val_accuracy': best, 'val_accuracy': r.get('val_accuracy'),
          'val_loss': r.get('val_loss'), 'test_accuracy': r.get('test_accuracy'),
          'test_loss': r.get('test_loss'), 'train_seconds': r.get('train_seconds'),
          'checkpoint_step': r.get('checkpoint_step'),
          'diverged_at_step': r.get('diverged_at_step'),
          'diverged_reason': r.get('diverged_reason'), 'selected': selected}


def summarize(plan: plan_lib.Plan, workdir: str, outcomes: list[Outcome], splits,
              train_seconds: float | None = None) -> dict:
  """The population's results.json, population.csv, console table and pictures."""
  chosen = members_lib.select(outcomes, plan.select, plan.metric)
  val = inference.classification_metrics(
      inference.combine_logits([outcomes[i].val_logits for i in chosen]), splits.val['label'])
  test_logits = inference.combine_logits([outcomes[i].test_logits for i in chosen])
  test = inference.classification_metrics(test_logits, splits.test['label'])
  note = members_lib.selection_note(outcomes, plan.select, chosen)
  ok = [o for o in outcomes if o.test_logits is not None]
  member_metrics = lambda split: [{'accuracy': o.results[f'{split}_accuracy'],
                                   'loss': o.results[f'{split}_loss']} for o in ok]
  results = {
      'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
      'val_accuracy': val['accuracy'], 'val_loss': val['loss'],
      'select': plan.select, 'selected': [outcomes[i].member.name for i in chosen],
      **({'selection_note': note} if note else {}),
      **inference.member_summary('test', member_metrics('test')),
      **inference.member_summary('val', member_metrics('val')),
      'train_seconds': train_seconds if train_seconds is not None else sum(
          o.results.get('train_seconds') or 0.0 for o in outcomes),
      'cost': _cost(outcomes, train_seconds),
      'members': [_member_record(o, i in chosen) for i, o in enumerate(outcomes)],
      'devices': jax.device_count(), 'processes': jax.process_count(),
      'backend': jax.default_backend(), 'config': plan.config.to_dict(),
  }
  log(f'Population of {len(outcomes)} members, select={plan.select} '
      f'({", ".join(results["selected"])}): test loss {test["loss"]:.4f} - accuracy '
      f'{test["accuracy"]:.4f}')
  log(table(results))
  if note:
    log(f'Note: {note}')
  log(f'Cost: {results["cost"]["member_steps"]:,} member-steps, '
      f'{results["cost"]["device_seconds"]:.1f} device-seconds')
  if parallel.is_main_process():
    files = workdir_lib.RunFiles.of(workdir)
    fields = members_lib.swept_fields([o.member for o in outcomes])
    if plan.search.kind != 'grid':
      _write_found_config(workdir, results, outcomes[chosen[0]], plan.search.kind)
    workdir_lib.write_json_atomic(files.results, results)
    write_csv(files.path(workdir_lib.POPULATION_CSV), results, fields)
    report = _pictures(plan.plots, outcomes, chosen)
    if report:
      report.draw_population(files.plots, results, [o.history for o in outcomes], fields)
      # curves.png: the learning curves of the delivered member (the first chosen).
      report.draw_all(files.plots, splits, test_logits, outcomes[chosen[0]].history)
  return results


def _cost(outcomes, train_seconds: float | None) -> dict:
  """What the population spent: every member's training steps (a diverged member's to its
  divergence; a search's slots all of theirs), and its seconds times the devices it held."""
  steps_of = lambda r: r.get('diverged_at_step') or r.get('checkpoint_step') or 0
  seconds = train_seconds if train_seconds is not None else sum(
      o.results.get('train_seconds') or 0.0 for o in outcomes)
  return {'member_steps': sum(steps_of(o.results) for o in outcomes),
          'device_seconds': seconds * jax.device_count()}


def _write_found_config(workdir: str, results: dict, delivered: Outcome, kind: str) -> None:
  """found_config.py: the delivered member's numbers as a single run (named in results)."""
  record = next(m for m in results['members'] if m['name'] == delivered.member.name)
  found = search_steps.write_found_config(workdir, record, delivered.results, kind)
  results['found_config'] = os.path.relpath(found, workdir)
  log(f"The delivered member's numbers as a single run: python launch.py --config={found} "
      f'--workdir=NEW_WORKDIR')


def _pictures(plots: bool, outcomes: list[Outcome], chosen: list[int]):
  """report.py (matplotlib is imported only when pictures are drawn), if this process draws
  the pictures of the members `chosen`: process 0, with config.plots, of members that have
  test logits (a run found already trained has none, and its pictures are there); else None."""
  if not (plots and parallel.is_main_process()) or any(
      outcomes[i].test_logits is None for i in chosen):
    return None
  signals.reached('plotting')
  from digitjax import report
  return report


def write_csv(path: str, results: dict, fields: list[str]) -> None:
  columns = (['index', 'name'] + fields + [
      'best_val_accuracy', 'val_accuracy', 'val_loss', 'test_accuracy', 'test_loss',
      'train_seconds', 'checkpoint_step', 'diverged_at_step', 'selected'])
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(columns)
  for m in results['members']:
    row = {**m, **{f: members_lib.format_value(m['overrides'].get(f, '')) for f in fields}}
    writer.writerow(['' if row.get(c) is None else row.get(c) for c in columns])
  with workdir_lib.written_aside(path) as tmp, open(tmp, 'w') as f:
    f.write(buffer.getvalue())


def table(results: dict) -> str:
  """The members as a table, best validation accuracy first."""
  fmt = lambda x: '-' if x is None else f'{x:.4f}'
  rows = sorted(results['members'], key=lambda m: (-(m['val_accuracy'] or -1), m['index']))
  width = max(12, *(len(m['name']) for m in rows)) + 2
  lines = [f'{"member":<{width}}{"val_acc":>9}{"best_val":>10}{"val_loss":>10}{"test_acc":>10}'
           f'{"test_loss":>11}{"train_s":>9}']
  for m in rows:
    mark = ' *' if m['selected'] else ''
    note = (f'  diverged at step {m["diverged_at_step"]}' + (
        f' ({m["diverged_reason"]})' if m.get('diverged_reason') else '')
            if m['diverged_at_step'] else '')
    seconds = '-' if m['train_seconds'] is None else f'{m["train_seconds"]:.1f}'
    lines.append(f'{m["name"]:<{width}}{fmt(m["val_accuracy"]):>9}'
                 f'{fmt(m["best_val_accuracy"]):>10}{fmt(m["val_loss"]):>10}'
                 f'{fmt(m["test_accuracy"]):>10}{fmt(m["test_loss"]):>11}{seconds:>9}'
                 f'{mark}{note}')
  lines.append(f'(* delivered: select={results["select"]}; test_accuracy '
               f'{results["test_accuracy"]:.4f}, test_loss {results["test_loss"]:.4f})')
  return '\n'.join(lines)
