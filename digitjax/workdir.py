"""The run's workdir: one process at a time, and a clear error when it cannot be written.

`claim(workdir)` creates the workdir and takes workdir/run.lock: a file holding the owner's pid
under an exclusive `flock`. The kernel drops a flock when its process dies, however it dies, so
a lock file left by a killed run is stale by construction and is taken over with a warning,
while a live owner makes a second run refuse to start. Inside the claim, OS errors that mean
"the disk refused the write" (read-only, full, not a directory...) become one-line UserErrors.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket

from digitjax.errors import UserError

LOCK_FILE = 'run.lock'
# Errors of writing that the user fixes on the disk side, not in the code.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                errno.ENOTDIR, errno.EISDIR)


class WorkdirBusy(UserError):
  pass


class WorkdirNotWritable(UserError):
  pass


def _not_writable(workdir: str, e: OSError) -> WorkdirNotWritable:
  reason = 'it is a file, not a directory' if e.errno == errno.EEXIST else e.strerror or str(e)
  where = f' ({e.filename})' if e.filename else ''
  return WorkdirNotWritable(
      f'cannot write to --workdir={workdir}: {reason}{where}; checkpoints saved before are '
      f'untouched; free space or fix the path, then run the same command')


def _is_disk_error(e: OSError, workdir: str) -> bool:
  """A refused write under `workdir` (a full disk may not say which file was being written)."""
  if e.errno not in _DISK_ERRNOS:
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
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = acquire(workdir) if exclusive else None
  except OSError as e:
    raise _not_writable(workdir, e) from e
  try:
    yield
  except OSError as e:
    if _is_disk_error(e, workdir):
      raise _not_writable(workdir, e) from e
    raise
  finally:
    if fd is not None:
      release(workdir, fd)
