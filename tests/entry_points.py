"""The clone's entry points (train.py, eval.py, tests/kill_at.py, ...) run as a user runs
them, in a subprocess on the CPU, for the tests of their behaviour."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args, check: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python <script> <args>` from the clone's root; with `check`, asserts exit status 0
  (the end of stderr in the message)."""
  proc = subprocess.run(
    [sys.executable, script, *map(str, args)],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc
