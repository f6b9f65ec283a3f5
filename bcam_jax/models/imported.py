"""A model of your own, by import path: `config.model.name='package.module:ClassName'`.

`import_model(path, num_classes, options, cam_layer)` imports `ClassName` from
`package.module`, checks that it is a Flax linen module and builds
`ClassName(num_classes=num_classes, **options)` inside `ImportedClassifier`, which runs it
with its CAM layer (`cam_layer`, a submodule path such as `'conv3'` or `'backbone/stage4'`)
intercepted, so it answers as our models do: `__call__(x, train=False) -> (logits,
{'cam': A})`. Its `__call__` gets `train` when it takes a `train` argument; its output is the
logits, a tuple or list starting with them, or anything with `.logits`. Training goes through
`bcam_jax.losses.layer_gradients` (one forward pass with a zero perturbation at the CAM layer
and one backward pass: no split into backbone and head is needed), evaluation through
`explain.LinenModel` at the same layer. Its variables live under `inner`.

Errors are `ImportError` / `TypeError` / `ValueError` with one line naming the path, the
class or the layer (the nearest layer names first).
"""

import importlib
import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcam_jax.models.heads import HeadKind

INNER = 'inner'  # the wrapped module's name: its variables' top-level key


def is_import_path(name: str) -> bool:
  """Whether a model name is `package.module:ClassName` rather than one of the zoo's."""
  return ':' in name


def import_class(path: str) -> type:
  """The class at `package.module:ClassName`; ImportError or TypeError in one line."""
  module_name, _, class_name = path.partition(':')
  if not module_name or not class_name:
    raise ImportError(f'model {path!r}: expected package.module:ClassName')
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise ImportError(f'model {path!r}: cannot import {module_name!r} ({error})') from None
  cls = getattr(module, class_name, None)
  if cls is None:
    raise ImportError(f'model {path!r}: module {module_name!r} has no {class_name!r}')
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    raise TypeError(
      f'model {path!r} is a {type(cls).__name__}, not a Flax linen module class; train NNX '
      'and Equinox models in your own loop with bcam_jax.cam_loss'
    )
  return cls


def _takes_train(cls: type) -> bool:
  try:
    return 'train' in inspect.signature(cls.__call__).parameters
  except (TypeError, ValueError):
    return False


def _logits(output):
  if isinstance(output, tuple | list) and output:
    return output[0]
  if isinstance(output, dict) and 'logits' in output:
    return output['logits']
  return getattr(output, 'logits', output)


class ImportedClassifier(nn.Module):
  """`inner` run with its `cam_layer` submodule's output recorded as features['cam']."""

  inner: nn.Module
  cam_layer: str
  import_path: str
  num_classes: int
  takes_train: bool = False
  dtype: Any = jnp.float32

  @property
  def kind(self) -> HeadKind:
    """Grad-CAM explains it: the default head and pooling."""
    return HeadKind()

  @nn.nowrap
  def label(self) -> str:
    return self.import_path

  @nn.nowrap
  def layer_path(self) -> str:
    """The CAM layer's path from this module's root (what the interceptors compare)."""
    return f'{INNER}/{self.cam_layer}'

  def __call__(self, x, train: bool = False):
    seen = []

    def capture(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == '__call__' and '/'.join(context.module.path) == self.layer_path():
        seen.append(out[0] if isinstance(out, tuple | list) else out)
      return out

    with nn.intercept_methods(capture):
      output = self.inner(x, train=train) if self.takes_train else self.inner(x)
    if not seen:
      raise ValueError(
        f'config.model.cam_layer={self.cam_layer!r} is not a layer of {self.import_path}'
      )
    return _logits(output), {'cam': seen[0]}


def import_model(
  path: str, num_classes: int, options: dict, cam_layer: str, dtype: Any = jnp.float32
) -> ImportedClassifier:
  """`ImportedClassifier` of `ClassName(num_classes=num_classes, **options)`."""
  cls = import_class(path)
  if not cam_layer:
    raise ValueError(
      f'model {path!r} needs config.model.cam_layer=<the path of its CAM layer submodule>'
    )
  try:
    inner = cls(num_classes=num_classes, **options)
  except TypeError as error:
    raise TypeError(
      f'model {path!r}: {cls.__name__}(num_classes={num_classes}, **{options!r}) failed: {error}'
    ) from None
  return ImportedClassifier(
    inner, cam_layer, path, num_classes, takes_train=_takes_train(cls), dtype=dtype
  )


def layer_shapes(model: ImportedClassifier, image_size: int, channels: int) -> dict[str, tuple]:
  """{submodule path inside the user's model: output shape} of every map or token layer,
  in call order, for error messages (shape inference only)."""
  shapes = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    first = out[0] if isinstance(out, tuple | list) and out else out
    path = '/'.join(context.module.path)
    if context.method_name == '__call__' and path and isinstance(first, jax.Array):
      if first.ndim >= 3:
        shapes.setdefault(path, tuple(first.shape))
    return out

  def run(x):
    with nn.intercept_methods(record):
      kwargs = {'train': False} if model.takes_train else {}
      return model.inner.init(jax.random.key(0), x, **kwargs)

  jax.eval_shape(run, jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32))
  return shapes
