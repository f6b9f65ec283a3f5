"""The layering of pyproject.toml's import-linter contract holds, and covers every module."""

import os
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _contract() -> dict:
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    (contract,) = tomllib.load(f)['tool']['importlinter']['contracts']
  return contract


def test_every_module_is_in_a_layer():
  """A module outside every layer would be unchecked: each one is in a layer, or in a
  package that is."""
  layers = {name.strip() for row in _contract()['layers'] for name in row.split(':')}
  assert len(layers) > 20, layers
  outside = []
  for directory, _, files in os.walk(os.path.join(REPO, 'bcam_jax')):
    for name in files:
      relative = os.path.relpath(os.path.join(directory, name), os.path.join(REPO, 'bcam_jax'))
      if name.endswith('.py') and relative != '__init__.py':
        top = relative.split(os.sep)[0].removesuffix('.py')
        if top not in layers:
          outside.append(relative)
  assert not outside, outside


def test_no_module_imports_a_higher_layer():
  lint = shutil.which('lint-imports', path=os.path.dirname(sys.executable))
  if lint is None:
    pytest.fail('lint-imports is not installed: pip install -r requirements.txt')
  proc = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert 'Contracts: 1 kept, 0 broken.' in proc.stdout
