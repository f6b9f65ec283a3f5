"""One writer per workdir: an OS file lock held while a run or an evaluation writes there.

Two `train.py` on one workdir would both save to the same Orbax directories and collide.
`locked(workdir)` takes an exclusive `flock` on `<workdir>/.lock-<process index>` for as
long as the block runs; the kernel releases it when the process ends, even by SIGKILL, so a
crashed run never leaves a stale lock. A second process that asks for the same lock fails at
once with the holder's PID and host. The processes of one multi-process job each lock
their own index, so they share the workdir, and a second job's process i meets the first
job's process i.
"""

import contextlib
import fcntl
import os
import socket

import jax


class WorkdirError(RuntimeError):
  """The workdir cannot be used: not a directory, not writable, or in use."""


class WorkdirLockedError(WorkdirError):
  """Another process holds the workdir."""


@contextlib.contextmanager
def locked(workdir: str):
  """Holds `workdir`'s lock for this process index while the block runs; `workdir` must
  exist."""
  if not os.path.isdir(workdir):
    raise WorkdirError(f'workdir {workdir} is not a directory.')
  if not os.access(workdir, os.W_OK):
    raise WorkdirError(f'workdir {workdir} is not writable: nothing could be saved there.')
  path = os.path.join(workdir, f'.lock-{jax.process_index()}')
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except PermissionError:
    raise WorkdirError(
      f'workdir {workdir} is not writable: nothing could be saved there.'
    ) from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'another process'
      raise WorkdirLockedError(
        f'{workdir} is in use by {holder} (lock {path}); wait for it to end or use '
        'another --workdir.'
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'process {os.getpid()} on {socket.gethostname()}'.encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
