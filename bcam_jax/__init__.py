"""bcam-jax: explanation-guided image classification in JAX/Flax.

The public API, imported on first use so that `import bcam_jax` stays cheap (no JAX):

    bcam_jax.train_and_evaluate(spec, workdir)  # a run_spec.RunSpec, or a configs config
    bcam_jax.evaluate_and_report(spec, workdir, bcam_jax.EvalOptions())
    bcam_jax.cam_loss(model, variables, images, labels, prototypes)  # any model's CAM term
    bcam_jax.cam, models, explain, objective, data, conditions, configs  # building blocks
"""

import importlib as _importlib

# The one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic).
__version__ = '0.1.0'

_MODULES = ('cam', 'conditions', 'configs', 'data', 'explain', 'models', 'objective')
# Public name -> the module that defines it.
_NAMES = {
  'train_and_evaluate': 'train_lib',
  'evaluate_and_report': 'eval_lib',
  'EvalOptions': 'eval_options',
  'RunSpec': 'run_spec',
  'cam_loss': 'losses',
}
__all__ = ['__version__', *_MODULES, *_NAMES]


def __getattr__(name: str):
  """Imports a public module or name of the package the first time it is used."""
  if name in _MODULES:
    return _importlib.import_module(f'{__name__}.{name}')
  if name in _NAMES:
    return getattr(_importlib.import_module(f'{__name__}.{_NAMES[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
