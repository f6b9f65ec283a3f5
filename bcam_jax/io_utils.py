"""Atomic file writes: a run killed mid-write never leaves a truncated file behind."""

import json
import os
import tempfile


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def atomic_write(path: str, write) -> None:
  """Calls write(binary file object) on a temp file in path's directory, then renames it."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path), suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def remove_stale_temporaries(directory: str) -> list[str]:
  """Deletes the temp files that `atomic_write` calls killed mid-write left in `directory`
  (call it only while holding the directory, e.g. its workdir lock); returns their names."""
  stale = [name for name in os.listdir(directory) if name.startswith('.') and name.endswith('.tmp')]
  for name in stale:
    os.unlink(os.path.join(directory, name))
  return stale


def write_json(path: str, obj) -> None:
  """Writes `obj` as indented JSON, atomically."""
  text = json.dumps(obj, indent=2, sort_keys=True).encode()
  atomic_write(path, lambda f: f.write(text))
