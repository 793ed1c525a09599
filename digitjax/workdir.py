"""The workdir: every file name under it, one way to write and read those files back, and one
run at a time.

Layout of a run (a population of one member):
  config.json        the run's config (the modes read it when --config is not given)
  checkpoints/       orbax: the latest `checkpoint_keep` and the best by validation accuracy
  metrics.jsonl      one JSON record per line (epochs, step logs, the test figures)
  tensorboard/       event files
  results.json       the finished run's figures
  eval.json          the last --mode=eval
  plots/             PNG pictures
  export/            --mode=export's files (the default --output; another folder may be given):
    savedmodel/      a TensorFlow SavedModel of what the run delivers
    model.onnx       an ONNX model of the same function
A population of several members adds, beside its own config.json, results.json and plots/:
  members/<i>-<overrides>/   each member's files, laid out as a run's (TensorBoard's under
  tensorboard/<i>-<overrides>/, so that TensorBoard overlays the members)
  population.csv     one row per member

JSON files are written aside and renamed into place (never half-written). JSON lines are
appended; a torn last line (a kill or power loss during a write) is reported and cut off when
the file is next opened; other lines that are not records, or a link in the file's place, are
reported as such, what the file held kept aside as `<name>.damaged`; and a run that resumes
from an earlier step than its log reached drops the records after that step, so no record is
ever duplicated.

`claim(workdir)` takes workdir/run.lock, a file holding the owner's pid under an exclusive
`flock`. The kernel drops a flock when its process dies, however it dies, so a lock left by a
killed run is stale by construction and is taken over with a warning, while a live owner makes a
second run refuse to start. Inside the claim, OS errors that mean "the disk refused the write"
(read-only, full, not a directory...) become one-line UserErrors.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket

from digitjax.errors import UserError

CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'
DAMAGED_CHECKPOINTS = 'damaged_checkpoints'
METRICS = 'metrics.jsonl'
TENSORBOARD = 'tensorboard'
RESULTS = 'results.json'
EVAL = 'eval.json'
PLOTS = 'plots'
EXPORT = 'export'
EXPORT_SAVEDMODEL = 'savedmodel'
EXPORT_ONNX = 'model.onnx'
MEMBERS = 'members'
POPULATION_CSV = 'population.csv'
LOCK_FILE = 'run.lock'
# Errors of writing that the user fixes on the disk side, not in the code.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                errno.ENOTDIR, errno.EISDIR)


@dataclasses.dataclass(frozen=True)
class RunFiles:
  """The files of one run: a whole workdir, or one member of a population."""
  dir: str
  tensorboard: str

  @classmethod
  def of(cls, workdir: str) -> 'RunFiles':
    return cls(workdir, os.path.join(workdir, TENSORBOARD))

  def path(self, name: str) -> str:
    return os.path.join(self.dir, name)

  @property
  def checkpoints(self) -> str:
    return self.path(CHECKPOINTS)

  @property
  def metrics(self) -> str:
    return self.path(METRICS)

  @property
  def results(self) -> str:
    return self.path(RESULTS)

  @property
  def config(self) -> str:
    return self.path(CONFIG)

  @property
  def plots(self) -> str:
    return self.path(PLOTS)


def member_files(workdir: str, index: int, name: str) -> RunFiles:
  """Member `index` of a population in `workdir`: members/<index>-<name>/, its TensorBoard run
  tensorboard/<index>-<name>/."""
  folder = f'{index:02d}-{safe_name(name)}'
  return RunFiles(os.path.join(workdir, MEMBERS, folder),
                  os.path.join(workdir, TENSORBOARD, folder))


def safe_name(name: str) -> str:
  """A member's name as one path component: no separators, no spaces, at most 120 characters
  (the index before it keeps cut names apart)."""
  name = re.sub(r'[^A-Za-z0-9._=,+()\-\[\]]+', '_', name).strip('_.') or 'member'
  return name[:120]


# ---------------------------------------------------------------------------------------------
# JSON files


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON aside and renames it into place: readers see the old file or the new one.

  Non-finite floats (nothing measured: an empty validation split) are written as null, so the
  file stays standard JSON.
  """
  with written_aside(path) as tmp, open(tmp, 'w') as f:
    json.dump(as_json(obj), f, indent=2, allow_nan=False)
    f.flush()
    os.fsync(f.fileno())


def aside(path: str) -> str:
  """Where a file or folder is written before it is renamed to `path`: beside it, so the rename
  stays on one file system."""
  return f'{path}.{os.getpid()}.tmp'


@contextlib.contextmanager
def written_aside(path: str):
  """Yields a path beside `path` to write a file or a folder to; when the block ends without an
  error it is renamed to `path`, replacing what was there, else it is removed.

  A file is replaced in one rename. A folder cannot be renamed over a non-empty one: the two
  names are exchanged in one step where the file system can (Linux renameat2), and the old
  folder removed; elsewhere the old is renamed aside first and removed after the new one is in
  place, so `path` is missing only between two renames, and a kill there leaves the old folder
  as `<path>.<pid>.old`.
  """
  tmp = aside(path)
  _remove(tmp)
  try:
    yield tmp
    if os.path.isdir(tmp) and os.path.isdir(path) and _exchange(tmp, path):
      with contextlib.suppress(OSError):  # tmp holds the old folder now
        _remove(tmp)
    elif os.path.isdir(tmp) and os.path.isdir(path):
      old = f'{path}.{os.getpid()}.old'
      _remove(old)
      os.rename(path, old)
      try:
        os.rename(tmp, path)
      except BaseException:
        os.rename(old, path)
        raise
      with contextlib.suppress(OSError):  # the new folder is in place: a leftover is harmless
        _remove(old)
    else:
      os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      _remove(tmp)
    raise


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: str, b: str) -> bool:
  """Swaps the names of `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE); False where
  the system or the file system cannot."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False
  raise OSError(code, os.strerror(code), b)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.unlink(path)


def as_json(obj):
  """`obj` as JSON holds it: tuples as lists, non-finite floats as None."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: as_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [as_json(v) for v in obj]
  return obj


def read_json(path: str, what: str = 'file') -> dict | None:
  """A JSON object from `path`; None if there is none. A damaged file (not JSON, not an
  object) is reported once and treated as absent: whatever wrote it will write it again."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning('Ignoring the damaged %s %s (%s); it will be written again', what, path,
                    _short(e))
    return None
  if not isinstance(obj, dict):
    logging.warning('Ignoring the damaged %s %s (not a JSON object); it will be written again',
                    what, path)
    return None
  return obj


RESULT_KEYS = ('test_accuracy', 'test_loss', 'checkpoint_step')


def read_results(path: str) -> dict | None:
  """A finished run's results.json, or None: absent, damaged, or missing a figure (then
  reported; the run that finds it so writes it again)."""
  results = read_json(path, 'results file')
  if results is None or results.get('diverged_at_step') is not None:
    return results
  missing = [k for k in RESULT_KEYS if not isinstance(results.get(k), (int, float))]
  if missing:
    logging.warning('Ignoring the damaged results file %s (no %s); it will be written again',
                    path, ', '.join(missing))
    return None
  return results


def _short(e: Exception) -> str:
  return (str(e).splitlines() or [type(e).__name__])[0][:120]


# ---------------------------------------------------------------------------------------------
# JSON lines


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file; a torn or damaged line is skipped (see JsonLines)."""
  records = []
  try:
    with open(path, 'rb') as f:
      lines = f.read().split(b'\n')
  except FileNotFoundError:
    return records
  for line in lines:
    if line.strip():
      record = _parse(line)
      if record is not None:
        records.append(record)
  return records


def _parse(line: bytes) -> dict | None:
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if isinstance(record, dict) else None


class JsonLines:
  """An append-only JSON-lines file that survives torn writes.

  Opening it repairs it: a torn last line (a write cut off by a kill) is reported and removed;
  lines that are not records (JSON objects with an integer 'step') are reported and removed,
  the file as it was kept aside as `<path>.damaged` (or `.damaged.2`, ...); a symbolic link in
  its place is never written through: its target is left untouched, what it held is kept aside
  likewise, and the records read through it go on in a file of the run's own. With
  `after_step`, records of steps beyond it (written by a run that got further than the
  checkpoint it is resumed from) are dropped, so a resumed run never duplicates them.
  """

  def __init__(self, path: str, after_step: int | None = None):
    self.path = path
    if os.path.lexists(path):
      self._repair(after_step)

  def _repair(self, after_step: int | None) -> None:
    link = os.readlink(self.path) if os.path.islink(self.path) else None
    try:
      with open(self.path, 'rb') as f:
        raw = f.read()
    except OSError:
      if link is None:
        raise
      raw = b''  # a dangling link, or one to a folder: nothing of this run's to keep
    lines = [line for line in raw.split(b'\n') if line.strip()]
    torn = 1 if (lines and not raw.endswith(b'\n') and _parse(lines[-1]) is None) else 0
    keep, foreign, dropped = [], 0, 0
    for line in lines[:len(lines) - torn]:
      record = _parse(line)
      if record is None or not isinstance(record.get('step'), int):
        foreign += 1
      elif after_step is not None and (
          record['step'] > after_step or (record['step'] == after_step and 'test_loss' in record)):
        dropped += 1  # written again by the resumed run (the test figures at its end too)
      else:
        keep.append(line)
    kept = _keep_aside(self.path, raw) if link is not None or foreign else None
    _report(self.path, link, torn, foreign, kept, len(keep))
    if link is not None or torn or foreign or dropped or (raw and not raw.endswith(b'\n')):
      with written_aside(self.path) as tmp, open(tmp, 'wb') as f:  # replaces a link itself
        f.write(b''.join(line + b'\n' for line in keep))
        f.flush()
        os.fsync(f.fileno())

  def append(self, record: dict) -> None:
    line = json.dumps(as_json(record), allow_nan=False) + '\n'
    with open(self.path, 'a') as f:
      f.write(line)


def _keep_aside(path: str, raw: bytes) -> str | None:
  """Writes `raw` (what a damaged log held) to the first free `<path>.damaged[.N]`."""
  if not raw:
    return None
  aside_path, n = f'{path}.damaged', 1
  while os.path.lexists(aside_path):
    n += 1
    aside_path = f'{path}.damaged.{n}'
  with open(aside_path, 'xb') as f:
    f.write(raw)
  return aside_path


def _report(path: str, link: str | None, torn: int, foreign: int, kept: str | None,
            records: int) -> None:
  """One warning line saying what was found in a JSON-lines file and what became of it."""
  found = []
  if link is not None:
    found.append(f'a link to {link} was in its place, not a file of this run: {link} is left '
                 f'untouched, the link replaced by a file of the run\'s own holding the '
                 f'{records} record(s) read through it')
  if foreign:
    found.append(f'{foreign} line(s) that are not this run\'s records (JSON objects with a '
                 f'step) removed')
  if torn:
    found.append(f'removed {torn} damaged line(s) (a write that was cut off)')
  if found:
    aside_note = f'; what it held is kept as {kept}' if kept else ''
    logging.warning('%s: %s%s', path, '; '.join(found), aside_note)


# ---------------------------------------------------------------------------------------------
# One run per workdir


class WorkdirBusy(UserError):
  pass


class WorkdirNotWritable(UserError):
  pass


def not_writable(workdir: str, e: OSError) -> WorkdirNotWritable:
  reason = {errno.EEXIST: 'it is a file, not a directory',
            errno.ENOTDIR: 'a folder on its path is a file'}.get(e.errno, e.strerror or str(e))
  where = f' ({e.filename})' if e.filename else ''
  fix = {errno.ENOSPC: 'free space', errno.EDQUOT: 'free space or raise the quota',
         errno.EFBIG: 'free space', errno.EROFS: 'make it writable or use another --workdir',
         errno.EACCES: 'fix its permissions or use another --workdir',
         errno.EPERM: 'fix its permissions or use another --workdir'}.get(
      e.errno, 'use a directory path for --workdir')
  return WorkdirNotWritable(
      f'cannot write to --workdir={workdir}: {reason}{where}; checkpoints saved before are '
      f'untouched; {fix}, then run the same command')


def is_disk_error(e: OSError, workdir: str) -> bool:
  """A refused write under `workdir` (a full disk may not say which file was being written)."""
  if e.errno not in DISK_ERRNOS:
    return False
  if not e.filename:
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
  root = os.path.abspath(workdir)
  return os.path.abspath(os.fsdecode(e.filename)).startswith(root + os.sep)


def _read_owner(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  return os.read(fd, 200).decode(errors='replace').strip()


def _same_file(fd: int, path: str) -> bool:
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


def acquire(workdir: str) -> int:
  """Takes workdir/run.lock for this process; returns its descriptor (see `release`)."""
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _read_owner(fd).replace('\n', ' on ') or 'unknown'
      os.close(fd)
      raise WorkdirBusy(f'--workdir={workdir} is in use by another run (process {owner}, lock '
                        f'{path}); wait for it to finish, stop it, or use another --workdir')
    if _same_file(fd, path):  # else its owner released it while we waited: take the new file
      break
    os.close(fd)
  stale = _read_owner(fd)
  if stale:
    logging.warning('Taking over the stale lock %s of process %s, which no longer runs',
                    path, stale.replace('\n', ' on '))
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, f'{os.getpid()}\n{socket.gethostname()}\n'.encode())
  os.fsync(fd)
  return fd


def release(workdir: str, fd: int) -> None:
  path = os.path.join(workdir, LOCK_FILE)
  if _same_file(fd, path):  # unlink while still holding the lock: waiters retry on a new file
    os.unlink(path)
  os.close(fd)


@contextlib.contextmanager
def claim(workdir: str, exclusive: bool = True):
  """Creates `workdir` and, if `exclusive`, holds its lock for the duration of the block.

  Only one process of a multi-process run should be `exclusive`; the others share the workdir.
  A workdir this call created is removed again if the block fails before writing anything.
  """
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = acquire(workdir) if exclusive else None
  except OSError as e:
    raise not_writable(workdir, e) from e
  try:
    yield
  except OSError as e:
    if is_disk_error(e, workdir):
      raise not_writable(workdir, e) from e
    raise
  finally:
    if fd is not None:
      release(workdir, fd)
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(workdir)  # only if empty: an error before any work leaves no trace
