"""The configs that ship with bcam-jax, and how a `--config` / `--grid` value finds one.

Each config is a Python file with `get_config()` (ml_collections' config-file protocol). They
live inside the package so that an installed `bcam-train` finds them from any directory; a
clone also has them as `configs/` (a link to this directory), so that
`python train.py --config=configs/resnet18_bcpl.py` works there as well.

A flag value is `<file or packaged name>[:<argument for get_config>]`: an existing file wins
(a user's own config), else a packaged name such as `resnet18_bcpl`,
`experiment:model=simple_cnn` or `grids/cpu_small` (`.py` optional).
"""

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
# Modules here that are not configs of their own (`base` holds the shared defaults).
_NOT_CONFIGS = ('__init__', 'base')


def names() -> list[str]:
  """Every packaged config name: `experiment`, `resnet18_bcpl`, ..., `grids/cpu_small`, ..."""
  found = []
  for sub in ('', 'grids'):
    for file in sorted(os.listdir(os.path.join(DIRECTORY, sub))):
      name, ext = os.path.splitext(file)
      if ext == '.py' and name not in _NOT_CONFIGS:
        found.append(f'{sub}/{name}' if sub else name)
  return found


def resolve(value: str) -> str:
  """`--config` value -> the same with a config file path, as ml_collections loads it.

  Raises ValueError, naming every packaged config, when `value` is neither an existing file
  nor a packaged name.
  """
  target, sep, argument = value.partition(':')
  if os.path.isfile(target):
    return value
  name = target.removesuffix('.py')
  if name in names():
    return os.path.join(DIRECTORY, f'{name}.py') + sep + argument
  raise ValueError(
    f'{target!r} is neither a config file nor a packaged config; packaged configs: '
    f'{", ".join(names())} (e.g. --config=resnet18_bcpl, '
    '--config=experiment:model=simple_cnn,loss=bcpl, --grid=grids/cpu_small)'
  )
