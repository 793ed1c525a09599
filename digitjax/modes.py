"""The modes that put a trained workdir to use without training: eval, predict, report, export;
and run_stress, a split's figures under fixed shifts of distribution (benchmarks/robustness.py).

Each works on a single run, on one member of a population (`member`: its index or name), or on
what a population delivers (its selection: the best member, or the mean probabilities of
several). Checkpoints are opened read-only. eval adds eval.json, report redraws plots/, predict
writes only its --output, export only its folder (workdir/export unless --output names
another). Evaluation goes through the Evaluator training used, with the config's
eval_batch_size, so `--checkpoint=latest` reproduces results.json exactly.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import re
import stat
import sys

import jax
import numpy as np

from digitjax import augment, configlib, data, inference, members as members_lib
from digitjax import metrics as metrics_lib, model as model_lib, parallel, signals, steps
from digitjax import workdir as workdir_lib
from digitjax.errors import UserError
from digitjax.members import Member, Outcome
from digitjax.metrics import log

# --split value -> the Splits field and the metric prefix results.json uses for it; uci_digits:
# other writers' digits (data.uci_digits), never part of a run's Splits.
SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test', data.UCI_DIGITS: data.UCI_DIGITS}
# report redraws what training drew at its end: the final state, which results.json describes.
DEFAULT_CHECKPOINT = {'eval': 'best', 'predict': 'best', 'report': 'latest', 'export': 'best'}


@dataclasses.dataclass
class Target:
  """What a mode uses: `members` (their mean probabilities), and where its files go."""
  members: list[Member]
  files: workdir_lib.RunFiles
  population: list[Member] | None = None  # all members, when the target is a selection
  results: dict | None = None             # the population's results.json

  @property
  def what(self) -> str:
    if self.population is None:
      return '' if self.members[0].is_base else f' of member {self.members[0].name}'
    return (f' of the population\'s selection (select={self.results.get("select")}: '
            f'{len(self.members)} of {len(self.population)} members)')


def target(config, workdir: str, member: str | None = None,
           members: list[Member] | None = None) -> Target:
  """The run, member or population selection that `workdir` and `member` name (`members`:
  members.members_of(config, workdir), when the caller has them already)."""
  members = members_lib.members_of(config, workdir) if members is None else members
  if members[0].alone:
    if member is not None:
      raise UserError(f'--member={member}: {workdir} was trained without config.sweep, so it '
                      f'has no members; leave --member out')
    return Target(members, workdir_lib.RunFiles.of(workdir))
  if member is not None:
    chosen = [m for m in members if member in (str(m.index), m.name)]
    if not chosen:
      raise UserError(f'--member={member} is not a member of this population: use an index '
                      f'0-{len(members) - 1} or a name ({", ".join(m.name for m in members[:4])}'
                      f'{", ..." if len(members) > 4 else ""})')
    return Target(chosen, chosen[0].files)
  files = workdir_lib.RunFiles.of(workdir)
  results = workdir_lib.read_json(files.results, 'results file')
  if not results or 'selected' not in results:
    raise UserError(f'{workdir} holds a population that has not finished training, so it has '
                    f'no selection yet; train it to the end (the same --mode=train command), '
                    f'or pick one member with --member=INDEX')
  chosen = [m for m in members if m.name in results['selected']]
  if len(chosen) != len(results['selected']):
    raise UserError(f'{files.results} selects members ({results["selected"]}) that the config '
                    f'does not declare; use the config the population was trained with')
  if config.sweep.select != results.get('select'):  # --config.sweep.select= given on top
    results = reselected(results, config.sweep.select, members, files.results)
    chosen = [m for m in members if m.name in results['selected']]
  return Target(chosen, files, members, results)


def reselected(results: dict, how: str, members: list[Member], path: str) -> dict:
  """The population's results with `how` choosing what it delivers, as training chooses
  (members.select: on each member's validation accuracy, diverged members never), from the
  members' records in results.json; 'selected' and each member's 'selected' follow."""
  records = {r.get('name'): r for r in results.get('members') or [] if isinstance(r, dict)}
  missing = [m.name for m in members if m.name not in records]
  if missing:
    raise UserError(f'{path} has no record of member {missing[0]}, so select={how!r} cannot '
                    f'choose among the members; train the population to the end again (the '
                    f'same --mode=train command), or pick one member with --member=INDEX')
  trained = lambda r: r.get('diverged_at_step') is None and r.get('test_accuracy') is not None
  outcomes = [Outcome(m, records[m.name], [],
                      test_logits=np.zeros(0) if trained(records[m.name]) else None)
              for m in members]  # only whether a member has logits matters to the choice
  chosen = members_lib.select(outcomes, how, members_lib.selection_metric(members[0].config))
  note = members_lib.selection_note(outcomes, how, chosen)
  if note:
    log(note)
  names = [members[i].name for i in chosen]
  return {**results, 'select': how, 'selected': names,
          'members': [{**records[m.name], 'selected': m.name in names} for m in members]}


class Restored:
  """The members' chosen checkpoints, restored: logits of any images, member by member. A run
  that kept an EMA of its weights (config.ema_decay) is used through the EMA: the model it
  delivered."""

  def __init__(self, goal: Target, which: str, mode: str):
    self.mesh = parallel.make_mesh()
    self.states, self.steps, self.epochs, self.evaluators = [], [], [], []
    for m in goal.members:
      state, step, meta = inference.restore(m.config, m.files, which, mode, self.mesh)
      self.states.append(steps.averaged(state))  # the EMA's weights, when the run kept one
      self.steps.append(step)
      self.epochs.append(meta.get('epoch'))
      self.evaluators.append(inference.Evaluator.for_config(m.config, self.mesh))

  def member_logits(self, images: np.ndarray, tta: int = 1) -> list[np.ndarray]:
    """Each member's logits; with `tta` > 1 views, the log of its mean probability over them."""
    return [e.tta_logits(s, images, tta) for e, s in zip(self.evaluators, self.states)]

  @property
  def step(self):
    return self.steps[0] if len(self.steps) == 1 else self.steps


# ---------------------------------------------------------------------------------------------
# eval


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise UserError(f'--split={split!r} is unknown: use one of {", ".join(SPLITS)}')


def split_arrays(config, split: str) -> dict[str, np.ndarray]:
  """The images and labels of eval's `split` for a model trained with `config`."""
  check_split(split)
  if split == data.UCI_DIGITS:
    return data.uci_digits(config.dataset)
  return getattr(data.load_splits(config), SPLITS[split])


def split_examples(goal: Target, split: str) -> tuple[str, dict]:
  """SPLITS' prefix of `split` and its images and labels; an empty split is a UserError."""
  config = goal.members[0].config
  prefix, examples = SPLITS[split], split_arrays(config, split)
  if not len(examples['label']):
    raise UserError(f'the {split} split is empty (config.validation_fraction='
                    f'{config.validation_fraction}); evaluate another --split')
  return prefix, examples


def run_eval(config, workdir: str, checkpoint: str = 'best', split: str = 'test',
             member: str | None = None, tta: int = 1) -> dict:
  """Evaluates a checkpoint on a split; prints the numbers and writes eval.json. `tta` > 1:
  each member's mean probabilities over that many views (inference.tta_views)."""
  check_split(split)
  inference.check_tta(tta)
  goal = target(config, workdir, member)
  restored = Restored(goal, checkpoint, 'eval')
  prefix, examples = split_examples(goal, split)
  member_logits = restored.member_logits(examples['image'], tta)
  logits = inference.combine_logits(member_logits)
  metrics = inference.classification_metrics(logits, examples['label'])
  per_member = [inference.classification_metrics(l, examples['label']) for l in member_logits]
  per_class = inference.per_class_accuracy(
      logits, examples['label'], configlib.DATASET_LABELS[goal.members[0].config.dataset])
  result = {'split': split, 'checkpoint': checkpoint, 'checkpoint_step': restored.step,
            'epoch': restored.epochs[0] if len(restored.epochs) == 1 else None,
            **({'members': [m.name for m in goal.members]} if goal.population else {}),
            **({'tta_views': inference.tta_views(tta)} if tta > 1 else {}),
            f'{prefix}_accuracy': metrics['accuracy'], f'{prefix}_loss': metrics['loss'],
            f'{prefix}_examples': len(examples['label']),
            f'{prefix}_per_class_accuracy': per_class,
            **inference.member_summary(prefix, per_member)}
  log(f'Checkpoint step {restored.step} ({checkpoint}){goal.what}'
      f'{f" with test-time augmentation ({tta} views)" if tta > 1 else ""}: {prefix}_accuracy '
      f'{metrics["accuracy"]:.4f} - {prefix}_loss {metrics["loss"]:.4f} '
      f'({len(examples["label"])} images)' + inference.describe(prefix, result))
  log('Per-class accuracy: ' + ' | '.join(
      f'{c} {"-" if a is None else f"{a:.4f}"}' for c, a in per_class.items()))
  if parallel.is_main_process():
    path = goal.files.path(workdir_lib.EVAL)
    workdir_lib.write_json_atomic(path, result)
    log(f'Wrote {path}')
  return result


# ---------------------------------------------------------------------------------------------
# stress: a split under fixed shifts of distribution (augment.STRESSES)


CLEAN = 'clean'  # the split as it is, the reference of every stress


def check_stresses(names: str | None) -> list[str]:
  """augment.STRESSES' names from 'all' (or None) or a comma-separated list, in their order;
  an unknown name is a UserError listing the known ones."""
  if names is None or names.strip() == 'all':
    return list(augment.STRESSES)
  given = [n.strip() for n in names.split(',') if n.strip()]
  unknown = [n for n in given if n not in augment.STRESSES]
  if unknown or not given:
    raise UserError(f'stress {unknown[0] if unknown else names!r} is unknown: give all, or '
                    f'some of {", ".join(augment.STRESSES)} separated by commas')
  return [n for n in augment.STRESSES if n in given]


def run_stress(config, workdir: str, stresses: str | None = None,
               request: 'Request | None' = None, also: tuple = ()) -> dict:
  """Accuracy and loss of what `workdir` delivers (or the request's member), at its checkpoint
  (default 'best'), on its split as it is (CLEAN) and under each stress (check_stresses'
  names), with its views as eval; the stressed images are uint8 like the split's. The figures
  are named as eval names them (test_accuracy, val_accuracy, ...). Stresses on the validation
  split judge robustness without looking at the test split. `also`: more (config, workdir)
  pairs whose members (what each delivers, or the request's member of each) join this one's
  as one ensemble, their mean probabilities; all must hold out the same images of the split.
  Prints one line a stress, writes nothing."""
  r = request or Request('eval')
  checkpoint, split, tta = r.checkpoint or DEFAULT_CHECKPOINT['eval'], r.split, r.tta
  check_split(split)
  names = check_stresses(stresses)
  inference.check_tta(tta)
  pairs = [(config, workdir), *also]
  workdirs = [w for _, w in pairs]
  goals = [target(c, w, r.member) for c, w in pairs]
  prefix, examples = _shared_examples(goals, workdirs, split)  # refused before any restore
  restored = [Restored(goal, checkpoint, 'eval') for goal in goals]
  accuracy, loss = {}, {}
  steps = restored[0].step if len(goals) == 1 else [x.step for x in restored]
  what = goals[0].what if len(goals) == 1 else (
      f': {sum(len(g.members) for g in goals)} members of {len(goals)} workdirs as one ensemble')
  log(f'Checkpoint step {steps} ({checkpoint}){what}'
      f'{f" with test-time augmentation ({tta} views)" if tta > 1 else ""}, '
      f'{len(examples["label"])} {split} images:')
  for name in [CLEAN] + names:
    images = (examples['image'] if name == CLEAN
              else np.asarray(augment.stressed(examples['image'], name)))
    logits = [one for x in restored for one in x.member_logits(images, tta)]
    metrics = inference.classification_metrics(inference.combine_logits(logits),
                                               examples['label'])
    accuracy[name], loss[name] = metrics['accuracy'], metrics['loss']
    log(f'  {name}: {prefix}_accuracy {metrics["accuracy"]:.4f} - {prefix}_loss '
        f'{metrics["loss"]:.4f}')
  members = [f'{w}:{m.name}' if len(goals) > 1 else m.name
             for w, g in zip(workdirs, goals) for m in g.members]
  return {'workdir': ' + '.join(workdirs), 'split': split, 'checkpoint': checkpoint,
          'checkpoint_step': steps,
          **({'members': members} if len(goals) > 1 or goals[0].population else {}),
          **({'tta_views': inference.tta_views(tta)} if tta > 1 else {}),
          f'{prefix}_examples': len(examples['label']), f'{prefix}_accuracy': accuracy,
          f'{prefix}_loss': loss, 'stresses': {n: augment.STRESSES[n].description for n in names}}


def _shared_examples(goals: list[Target], workdirs: list[str], split: str) -> tuple[str, dict]:
  """split_examples of the first goal, once every other goal is found to hold out the same
  images with the same labels (an ensemble is measured on images none of its members saw)."""
  prefix, examples = split_examples(goals[0], split)
  for goal, workdir in zip(goals[1:], workdirs[1:]):
    _, other = split_examples(goal, split)
    if not all(np.array_equal(other[k], examples[k]) for k in ('label', 'image')):
      raise UserError(f'{workdir} holds out other {split} images than {workdirs[0]} '
                      f'(their config.dataset, seed or data.split_seed differ), so they cannot be '
                      f'measured as one ensemble; combine runs that share a holdout')
  return prefix, examples


# ---------------------------------------------------------------------------------------------
# predict


def _csv_text(names: list[str], probabilities: np.ndarray) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')  # quotes any path holding a comma
  writer.writerow(['path', 'prediction', 'confidence'])
  for name, p in zip(names, probabilities):
    writer.writerow([name, int(p.argmax()), f'{p.max():.4f}'])
  return buffer.getvalue()


def check_output(output: str, inputs: list[str], workdir: str) -> None:
  """An --output that would overwrite an input, or a file of the workdir, is refused before
  any work: outputs never replace what a run or a user depends on."""
  from digitjax import images
  target = os.path.realpath(output)
  if os.path.isdir(target):
    raise UserError(f'--output={output} is a folder; give a file name, e.g. '
                    f'{os.path.join(output, "predictions.csv")}')
  read = {os.path.realpath(path) for path, problem in images.expand(inputs) if not problem}
  if target in read:
    raise UserError(f'--output={output} is one of the --inputs; write the predictions to '
                    f'another file')
  root = os.path.realpath(workdir)
  if target == root or target.startswith(root + os.sep):
    raise UserError(f'--output={output} is inside --workdir={workdir}, which holds the run\'s '
                    f'own files; write the predictions elsewhere')


def _write_text(text: str, output: str | None) -> None:
  """Writes `text` to stdout or `output`. A file (or a link to one) is written aside and renamed
  over it, so it is replaced whole or not at all and a link keeps pointing at it; a device or a
  pipe (/dev/stdout, a FIFO) is written to as it is, never replaced."""
  if not output:
    sys.stdout.write(text)
    sys.stdout.flush()
    return
  stream = False
  try:
    stream = os.path.exists(output) and not stat.S_ISREG(os.stat(output).st_mode)
    if stream:
      with open(output, 'w') as f:
        f.write(text)
      return
    with workdir_lib.written_aside(os.path.realpath(output)) as tmp, open(tmp, 'w') as f:
      f.write(text)
  except OSError as e:
    raise UserError(f'--output={output}: cannot write ({e.strerror})'
                    f'{"" if stream else "; the file is unchanged"}') from e


def run_predict(config, workdir: str, inputs: list[str], output: str | None = None,
                checkpoint: str = 'best', member: str | None = None) -> int:
  """Classifies image files, folders of them and arrays; returns the exit status.

  The CSV goes to stdout or `output`; each unreadable input is one `PATH: error: reason` line on
  stderr and makes the status 1, while the other inputs are still classified.
  """
  return predict(config, workdir, Request('predict', checkpoint, inputs=inputs, output=output,
                                          member=member))


def predict(config, workdir: str, r: 'Request') -> int:
  """run_predict with every option of `r`, test-time augmentation too (`r.tta` > 1: the mean
  probabilities over that many views, inference.tta_views)."""
  from digitjax import images  # Pillow is needed only here
  inputs, output, member, tta = r.inputs, r.output, r.member, r.tta
  checkpoint = r.checkpoint or DEFAULT_CHECKPOINT['predict']
  if not inputs:
    raise UserError('--mode=predict needs --inputs=PATH[,PATH...] (image files, folders, '
                    '.npy/.npz arrays)')
  inference.check_tta(tta)
  if output:
    check_output(output, inputs, workdir)
  goal = target(config, workdir, member)
  restored = Restored(goal, checkpoint, 'predict')
  read = images.read_inputs(inputs)
  probabilities = np.zeros((0, configlib.DATASET_LABELS[goal.members[0].config.dataset]))
  if len(read.images):
    # An ensemble's confidence is its mean softmax probability: combine_logits is its log.
    probabilities = inference.probabilities(inference.combine_logits(
        restored.member_logits(read.images[..., None], tta)))
  if parallel.is_main_process():  # every process computes, one speaks
    for path, reason in read.errors:
      print(f'{path}: error: {reason}', file=sys.stderr, flush=True)
    _write_text(_csv_text(read.names, probabilities), output)
  return 1 if read.errors else 0


# ---------------------------------------------------------------------------------------------
# report


def run_report(config, workdir: str, checkpoint: str = 'latest',
               member: str | None = None) -> list[str]:
  """Redraws the pictures from checkpoints and metrics.jsonl, without training."""
  goal = target(config, workdir, member)
  restored = Restored(goal, checkpoint, 'report')
  splits = data.load_splits(goal.members[0].config, firsts=True)
  test_logits = inference.combine_logits(restored.member_logits(splits.test['image']))
  if not parallel.is_main_process():  # all processes evaluate; process 0 draws, as in training
    return []
  from digitjax import report  # matplotlib is imported only when pictures are drawn
  # The learning curves of the first member, as training drew them (the delivered one's).
  paths = report.draw_all(goal.files.plots, splits, test_logits,
                          metrics_lib.read_history(goal.members[0].files))
  if goal.population is not None:
    paths += report.draw_population(
        goal.files.plots, goal.results, [metrics_lib.read_history(m.files)
                                         for m in goal.population],
        members_lib.swept_fields(goal.population))
  log(f'Drew {len(paths)} pictures of checkpoint step {restored.step} ({checkpoint})'
      f'{goal.what} into {goal.files.plots}: {", ".join(os.path.basename(p) for p in paths)}')
  return paths


# ---------------------------------------------------------------------------------------------
# export


def export_folder(workdir: str, output: str | None) -> str:
  return output or os.path.join(workdir, workdir_lib.EXPORT)


def check_export_output(folder: str, output: str | None, members: list[Member],
                        workdir: str) -> None:
  """Refuses, before any work, an --output export must not write to: an existing file, a
  folder inside checkpoints (the workdir's or a member's), or a folder holding anything export
  did not write (export replaces the folder whole)."""
  given = f'--output={output}' if output else f'the export folder {folder}'
  target = os.path.realpath(folder)
  if os.path.exists(target) and not os.path.isdir(target):
    raise UserError(f'{given} is an existing file; export writes a folder '
                    f'({workdir_lib.EXPORT_SAVEDMODEL}/ and {workdir_lib.EXPORT_ONNX}): give a '
                    f'folder path')
  runs = [workdir_lib.RunFiles.of(workdir)] + [m.files for m in members]
  for files in runs:
    for name in (workdir_lib.CHECKPOINTS, workdir_lib.DAMAGED_CHECKPOINTS):
      protected = os.path.realpath(files.path(name))
      if target == protected or target.startswith(protected + os.sep):
        raise UserError(f'{given} is inside {files.path(name)}, which only training writes; '
                        f'export elsewhere (the default is {export_folder(workdir, None)})')
  savedmodel = os.path.join(target, workdir_lib.EXPORT_SAVEDMODEL)
  if os.path.lexists(savedmodel) and not os.path.isfile(os.path.join(savedmodel,
                                                                     'saved_model.pb')):
    raise UserError(f'{os.path.join(folder, workdir_lib.EXPORT_SAVEDMODEL)} exists and is not '
                    f'a SavedModel, so export will not replace it; move it, or give another '
                    f'--output')
  onnx_file = os.path.join(target, workdir_lib.EXPORT_ONNX)
  if os.path.isdir(onnx_file):
    raise UserError(f'{os.path.join(folder, workdir_lib.EXPORT_ONNX)} is a folder, so export '
                    f'will not replace it; move it, or give another --output')
  others = sorted(n for n in (os.listdir(target) if os.path.isdir(target) else [])
                  if n not in _EXPORTED and not _EXPORT_LEFTOVER.fullmatch(n))
  if others:
    raise UserError(f'{given} holds {others[0]}, which export did not write; export replaces '
                    f'the folder whole: give a new or empty folder, or move '
                    f'{"what it holds" if len(others) > 1 else others[0]}')


_EXPORTED = (workdir_lib.EXPORT_SAVEDMODEL, workdir_lib.EXPORT_ONNX)
# What earlier versions of export left inside the folder when killed: replaced with it.
_EXPORT_LEFTOVER = re.compile(rf'({"|".join(map(re.escape, _EXPORTED))})\.[0-9]+\.(tmp|old)')


def run_export(config, workdir: str, output: str | None = None, checkpoint: str = 'best',
               member: str | None = None) -> list[str]:
  """Writes what the target delivers as `<folder>/savedmodel/` (TensorFlow) and
  `<folder>/model.onnx` (ONNX), one float32 function: uint8 images 'images' (N, 28, 28) ->
  'probabilities' (N, classes), the members' mean for a population's selection (export.py).
  The folder is `output`, or workdir/export. Both files are written into a sibling folder that
  then replaces it whole (workdir.written_aside): a signal, an error or a kill leaves the
  previous export complete, never files of two. Returns the paths written, one line printed
  for each."""
  from digitjax import export  # its TensorFlow and onnx are imported when the files are written
  missing = export.missing_packages()
  if missing:
    raise UserError(f'--mode=export needs {" and ".join(missing)}, which '
                    f'{"is" if len(missing) == 1 else "are"} not installed; pip install -e '
                    f'\'.[export]\'')
  folder = export_folder(workdir, output)
  declared = members_lib.members_of(config, workdir)
  check_export_output(folder, output, declared, workdir)
  goal = target(config, workdir, member, declared)
  restored = Restored(goal, checkpoint, 'export')
  members = [(model_lib.build_model(m.config.model), jax.device_get(state.variables()))
             for m, state in zip(goal.members, restored.states)]
  with metrics_lib.quiet_native_stderr():  # TensorFlow's C++ start-up notices (jax2tf needs it)
    import tensorflow  # noqa: F401
  signals.check('before exporting; nothing was written')
  if not parallel.is_main_process():  # every process restores; one writes
    return []
  what = (f'checkpoint step {restored.step} ({checkpoint}){goal.what}: uint8 images (N, 28, 28) '
          f'-> probabilities (N, {configlib.DATASET_LABELS[goal.members[0].config.dataset]})')
  _write_export(export, members, os.path.realpath(folder), folder)
  written = [os.path.join(folder, name) for name in _EXPORTED]
  for path, kind in zip(written, ('TensorFlow SavedModel', 'ONNX model')):
    log(f'Wrote {path}: {kind} of {what}')
  return written


def _write_export(export, members: list, target_dir: str, folder: str) -> None:
  """Both files into a sibling of `target_dir`, which then replaces it whole."""
  def kept() -> str:  # what the folder holds while the new export is not in place
    if any(os.path.lexists(os.path.join(target_dir, n)) for n in _EXPORTED):
      return f'{folder} still holds the previous export, unchanged'
    return 'nothing was written'

  try:
    for line in export.clean_leftovers(target_dir):
      logging.warning('%s', line)
    os.makedirs(os.path.dirname(target_dir), exist_ok=True)
    with workdir_lib.written_aside(target_dir) as new:
      os.makedirs(new)
      export.export_savedmodel(members, os.path.join(new, workdir_lib.EXPORT_SAVEDMODEL))
      signals.reached('exporting')
      signals.check(f'while exporting; {kept()}')
      export.export_onnx(members, os.path.join(new, workdir_lib.EXPORT_ONNX))
      signals.check(f'while exporting; {kept()}')
  except OSError as e:
    raise UserError(f'cannot write the export to {folder} ({e.strerror or e}'
                    f'{f": {e.filename}" if e.filename else ""}); {kept()}; make it writable '
                    f'(or free space), or give another --output') from e


@dataclasses.dataclass(frozen=True)
class Request:
  """What a mode other than train is asked (launch.py's flags): the mode, the checkpoint
  (default: DEFAULT_CHECKPOINT's), eval's split, predict's inputs, predict's or export's output,
  a population's member, and eval's and predict's test-time augmentation views."""
  mode: str
  checkpoint: str | None = None
  split: str = 'test'
  inputs: list[str] | None = None
  output: str | None = None
  member: str | None = None
  tta: int = 1


def run(config, workdir: str, request: Request) -> int:
  """Runs one of the modes other than train; returns the process's exit status."""
  with signals.recorded():
    return _run(config, workdir, request)


def _run(config, workdir: str, r: Request) -> int:
  # The config is checked where its members are found (members.override_sets), once.
  checkpoint = r.checkpoint or DEFAULT_CHECKPOINT.get(r.mode)
  if r.mode == 'eval':
    run_eval(config, workdir, checkpoint, r.split, r.member, r.tta)
    return 0
  if r.mode == 'predict':
    return predict(config, workdir, dataclasses.replace(r, checkpoint=checkpoint))
  if r.mode == 'report':
    run_report(config, workdir, checkpoint, r.member)
    return 0
  if r.mode == 'export':
    run_export(config, workdir, r.output, checkpoint, r.member)
    return 0
  raise UserError(f'--mode={r.mode!r} is unknown: use train, eval, predict, report or export')
