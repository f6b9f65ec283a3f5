"""The code map in README.md is the layering: no bcam_jax module imports one listed below it."""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layers() -> dict[str, int]:
  """Module name (e.g. 'bcam_jax.data', 'bcam_jax.parallel') -> its row in the code map."""
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  section = text.split('## Code map', 1)[1].split('\n## ', 1)[0]
  layers = {}
  rows = [line for line in section.splitlines() if line.startswith('| `bcam_jax/')]
  for row, line in enumerate(rows):
    first = line.split('|')[1]
    for path in re.findall(r'`([a-z_/]+(?:\.py)?/?)`', first):
      name = path.removesuffix('.py').removesuffix('/').replace('/', '.')
      layers[name if name.startswith('bcam_jax.') else f'bcam_jax.{name}'] = row
  return layers


def _layer_of(module: str, layers: dict[str, int]) -> int:
  """The row of `module` or of the package holding it."""
  parts = module.split('.')
  for end in range(len(parts), 1, -1):
    if '.'.join(parts[:end]) in layers:
      return layers['.'.join(parts[:end])]
  raise AssertionError(f'{module} is not in the README code map')


def _imports(path: str) -> set[str]:
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('bcam_jax'):
      if node.module == 'bcam_jax':
        found |= {f'bcam_jax.{alias.name}' for alias in node.names}
      else:
        found.add(node.module)
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith('bcam_jax.')}
  return found


def test_every_module_is_on_the_map_and_imports_only_lower_layers():
  layers = _layers()
  assert len(set(layers.values())) > 15, layers  # the map was parsed
  violations = []
  for directory, _, files in os.walk(os.path.join(REPO, 'bcam_jax')):
    for name in files:
      if not name.endswith('.py') or (directory.endswith('bcam_jax') and name == '__init__.py'):
        continue
      path = os.path.join(directory, name)
      module = os.path.relpath(path, REPO).removesuffix('.py').replace(os.sep, '.')
      module = module.removesuffix('.__init__')
      row = _layer_of(module, layers)
      for dep in _imports(path):
        if _layer_of(dep, layers) > row:
          violations.append(f'{module} (row {row}) imports {dep} (row {_layer_of(dep, layers)})')
  assert not violations, '\n'.join(violations)
