"""A named layer of any model as features plus the rest of the network as a function of them.

Every gradient method of `bcam_jax.cam` takes a layer's features `A` and a per-sample
`head_fn` mapping `A` to logits. The classes here build both, with no change to the model,
for each kind of model a JAX user has:

  - `CamModel`: our `bcam_jax.models` classifiers: the CAM layer 'cam' through the model's
    own backbone and head (the fast path), any stage of the features dict through
    Flax perturbations, any other submodule by module path as `LinenModel` does.
  - `LinenModel`: any Flax linen module; the layer is a submodule's path, '/'-joined
    (`'Conv_1'`, `'backbone/stage4'`), its `__call__` output intercepted with
    `nn.intercept_methods`.
  - `NNXModel`: any Flax NNX module; the layer is an attribute path (`'conv2'`,
    `'blocks.3'`, `'encoder.layers.11'`), its call wrapped on a merged copy.
  - `FunctionsModel`: a pair of pure functions `features_fn(variables, x)` and
    `head_fn(variables, a)`.
  - `EquinoxModel`: any Equinox module (split into its arrays and the rest); the layer is an
    attribute path, the module vmapped over the batch, its channels-first
    maps given NHWC.

Each has `logits(variables, x)`, `features(variables, x, layer) -> (A, head_fn)`,
`perturbed(variables, x, layer, delta) -> (logits, A, state updates)` (one forward pass
with `delta` added to the layer's output, what `bcam_jax.cam_loss` differentiates), `layers`
(the valid layer names with their output shapes), `class_weights(variables)` (for CAM) and
`label()`. For a layer inside the model, `head_fn(a)` runs the whole model with the layer's
output replaced by `a`, so its value at `a = A` is the model's logits and its VJP there is
d logits / d layer; that is per sample when the model has no batch coupling (evaluation
mode: BatchNorm with running averages, no dropout).
"""

import dataclasses
import difflib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from bcam_jax import models

# An array or token layer has a batch axis and at least two more: NHWC maps or (N, L, D).
_MIN_LAYER_NDIM = 3


def _logits_of(output) -> jax.Array:
  """The logits in a model's output: itself, the first element of a tuple or list
  (big_vision's `(logits, out_dict)`, our models' `(logits, features)`), a dict's or an output
  object's `logits` (HuggingFace's `ModelOutput`, a dataclass); a TypeError saying how to
  pick them otherwise."""
  found = output
  if isinstance(output, tuple | list) and output:
    found = output[0]
  elif isinstance(output, Mapping) and 'logits' in output:
    found = output['logits']
  elif not isinstance(output, jax.Array | np.ndarray) and hasattr(output, 'logits'):
    found = output.logits
  if not isinstance(found, jax.Array | np.ndarray):
    raise TypeError(
      f'the model returned a {type(output).__name__}, not logits: give the adapter '
      'output=<function of the output returning the logits>, e.g. '
      'explain.LinenModel(model, output=lambda out: out.scores)'
    )
  return found


def _first_array(out):
  """(the layer's array, a function putting an edited one back): the output itself, or
  the first element of a tuple or list (a transformer block's `(hidden, attention)`)."""
  if isinstance(out, tuple | list) and out and isinstance(out[0], jax.Array):
    return out[0], lambda a: type(out)([a, *out[1:]])
  return out, lambda a: a


# Layers an unknown-layer error lists in full; beyond that, the nearest names.
_LISTED_LAYERS = 8


def _unknown_layer(layer: str, model_label: str, shapes: dict[str, tuple]) -> ValueError:
  described = lambda names: ', '.join(f'{name} {shapes[name]}' for name in names)
  if len(shapes) <= _LISTED_LAYERS:
    return ValueError(
      f'layer {layer!r} is not a layer of {model_label}; valid: {described(shapes)}'
    )
  near = difflib.get_close_matches(layer, list(shapes), n=5, cutoff=0.0)
  return ValueError(
    f'layer {layer!r} is not a layer of {model_label}; nearest: {described(near)} '
    f'(and {len(shapes) - len(near)} more: Explainer.layer_shapes lists them all)'
  )


def _called_once(layer: str, model_label: str, outputs: list) -> jax.Array:
  if len(outputs) != 1:
    raise ValueError(
      f'layer {layer!r} of {model_label} is called {len(outputs)} times in one forward '
      'pass; explain a layer that is called once'
    )
  return outputs[0]


def repeat_to(values, batch: int):
  """`values` `(N, ...)` repeated sample-major to `batch` rows (`jnp.repeat`), for a head
  given `batch = N * k` feature sets with sample i's k sets contiguous (Ablation-CAM); the
  values themselves when `batch == N`."""
  if values is None or values.shape[0] == batch:
    return values
  if batch % values.shape[0]:
    raise ValueError(f'a batch of {batch} feature sets is not a multiple of {values.shape[0]}')
  return jnp.repeat(values, batch // values.shape[0], axis=0)


def _replaced_layer_head(run, x, layer_value: jax.Array):
  """head_fn(a) = run(x, a - A + output): the model with the layer's output moved to `a`.

  Adding `a - stop_gradient(A)` to the output (rather than substituting `a`) keeps the
  computation identical to the plain forward pass at `a = A`. Given `N * k` feature sets
  (sample-major), the inputs are repeated to match, so the rest of the network, skip
  connections included, sees each sample's own earlier activations.
  """
  anchor = jax.lax.stop_gradient(layer_value)

  def head_fn(a):
    delta = a - repeat_to(anchor, a.shape[0])
    return run(repeat_to(x, a.shape[0]), lambda out: out + delta.astype(out.dtype))

  return head_fn


@dataclasses.dataclass(frozen=True)
class LinenModel:
  """Any Flax linen module, explained at a submodule given by its '/'-joined path.

  Attributes:
    module: the model; `module.apply(variables, x, **apply_kwargs)` gives its output.
    apply_kwargs: e.g. `{'train': False}` for evaluation mode.
    output: the logits from the output (default: the output itself, or its first element
      when it is a tuple or list).
    default_layer: the layer explained when the explainer names none.
  """

  module: nn.Module
  apply_kwargs: dict = dataclasses.field(default_factory=dict)
  output: Callable | None = None
  default_layer: str | None = None

  def label(self) -> str:
    return type(self.module).__name__

  def _logits(self, output) -> jax.Array:
    return (self.output or _logits_of)(output)

  def _apply(self, variables, x: jax.Array, **apply_kwargs):
    """`module.apply` with the adapter's apply_kwargs, updated by `apply_kwargs`."""
    return self.module.apply(variables, x, **(self.apply_kwargs | apply_kwargs))

  def logits(self, variables, x: jax.Array) -> jax.Array:
    return self._logits(self._apply(variables, x))

  def _tap(self, layer: str, edit=None, seen=None):
    """An interceptor context: the layer's `__call__` output recorded in `seen` and passed
    through `edit`."""
    active = []  # a module's __call__ calling its parent class's (nn.SelfAttention) is one call

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name != '__call__' or '/'.join(context.module.path) != layer or active:
        return next_fun(*args, **kwargs)
      active.append(layer)
      out = next_fun(*args, **kwargs)
      active.pop()
      first, put_back = _first_array(out)
      if seen is not None:
        seen.append(first)
      return out if edit is None else put_back(edit(first))

    return nn.intercept_methods(interceptor)

  def _run(self, variables, x, layer: str, edit=None, seen=None) -> jax.Array:
    """The logits with the layer's output passed through `edit`, each output recorded."""
    with self._tap(layer, edit, seen):
      return self.logits(variables, x)

  def perturbed(self, variables, x: jax.Array, layer: str, delta=None, **apply_kwargs):
    """(logits, the layer's output A, the mutated collections or {}) of one forward pass
    with `delta` added to A (None: nothing added). `apply_kwargs` (e.g. `train=True`,
    `mutable=['batch_stats']`, `rngs={'dropout': key}`) update the adapter's own."""
    seen = []
    edit = None if delta is None else (lambda out: out + delta.astype(out.dtype))
    with self._tap(layer, edit, seen):
      output = self._apply(variables, x, **apply_kwargs)
    updates = {}
    if (self.apply_kwargs | apply_kwargs).get('mutable'):
      output, updates = output
    if not seen:
      raise _unknown_layer(layer, self.label(), self.layers(variables, x))
    return self._logits(output), _called_once(layer, self.label(), seen), updates

  def layers(self, variables, x: jax.Array) -> dict[str, tuple]:
    """{path: output shape} of every submodule whose output is an NHWC or token array, in
    call order (shape inference only)."""
    shapes = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = '/'.join(context.module.path)
      first, _ = _first_array(out)
      is_layer = isinstance(first, jax.Array) and first.ndim >= _MIN_LAYER_NDIM
      if context.method_name == '__call__' and path and is_layer:
        shapes.setdefault(path, tuple(first.shape))
      return out

    with nn.intercept_methods(interceptor):
      jax.eval_shape(lambda v, inputs: self.logits(v, inputs), variables, x)
    return shapes

  def features(self, variables, x: jax.Array, layer: str):
    layer = layer if layer is not None else self.default_layer
    seen = []
    self._run(variables, x, layer, seen=seen)
    if not seen:
      raise _unknown_layer(layer, self.label(), self.layers(variables, x))
    value = _called_once(layer, self.label(), seen)
    run = lambda inputs, edit: self._run(variables, inputs, layer, edit)
    return value, _replaced_layer_head(run, x, value)

  def class_weights(self, variables):
    raise ValueError(
      f'CAM needs the class weights of our models; for {self.label()} use grad_cam '
      '(equal to CAM up to scale for a global-average-pool + dense head)'
    )


@dataclasses.dataclass(frozen=True)
class CamModel(LinenModel):
  """One of our `bcam_jax.models` classifiers. Layer 'cam' (the default) goes through the
  model's backbone and per-sample head; a stage of the features dict ('stage2', ...) through
  the model's Flax perturbations; any other submodule path as `LinenModel`."""

  default_layer: str | None = 'cam'

  def label(self) -> str:
    return self.module.label()

  def _apply(self, variables, x: jax.Array, **apply_kwargs):
    # A `perturbations` collection from `model.init` is sized to the init batch.
    return super()._apply(_without_perturbations(variables), x, **apply_kwargs)

  def layers(self, variables, x: jax.Array) -> dict[str, tuple]:
    stages = jax.eval_shape(
      functools.partial(self.module.apply, method='backbone'),
      _without_perturbations(variables),
      x,
    )
    shapes = {k: tuple(v.shape) for k, v in stages.items() if v.ndim >= _MIN_LAYER_NDIM}
    return shapes | super().layers(variables, x)

  def features(self, variables, x: jax.Array, layer: str | None):
    layer = layer if layer is not None else self.default_layer
    if layer != 'cam':
      stages = jax.eval_shape(
        functools.partial(self.module.apply, method='backbone'),
        _without_perturbations(variables),
        x,
      )
      if layer not in stages:
        return super().features(variables, x, layer)
    return layer_features(self.module, variables, x, layer)

  def class_weights(self, variables):
    return self.module.class_weights(variables['params'])


@dataclasses.dataclass(frozen=True)
class ImportedModel(LinenModel):
  """A model by import path (`models.imported`): its CAM layer (the default) also answers
  to 'cam', as our models' does; any other submodule by its path from the root
  (`inner/...`)."""

  def label(self) -> str:
    return self.module.label()

  def _layer(self, layer):
    return self.default_layer if layer in (None, 'cam') else layer

  def features(self, variables, x: jax.Array, layer: str | None):
    return super().features(variables, x, self._layer(layer))

  def perturbed(self, variables, x: jax.Array, layer, delta=None, **apply_kwargs):
    return super().perturbed(variables, x, self._layer(layer), delta, **apply_kwargs)


def _without_perturbations(variables) -> dict:
  return {k: v for k, v in variables.items() if k != 'perturbations'}


def layer_features(model, variables, x: jax.Array, layer: str = 'cam'):
  """(features of `layer` `(N, h, w, K)`, head_fn mapping them to logits `(N, C)`) for one
  of our models: 'cam' or a stage name of its features dict.

  For 'cam' head_fn is the model's head. For another stage it runs the whole model with
  `a - A` added at that stage through Flax perturbations, so its value is the model's
  logits at a = A and its VJP there is d logits / d layer, per sample.
  """
  variables = _without_perturbations(variables)
  if layer == 'cam':
    features = model.apply(variables, x, method='backbone')
    query = model.head_query(features)  # e.g. CA-Stream's query, a ViT's class token
    head = lambda a: model.apply(variables, a, repeat_to(query, a.shape[0]), method='head')
    return features['cam'], head
  features, state = model.apply(variables, x, method='backbone', mutable=['perturbations'])
  zeros = traverse_util.flatten_dict(state.get('perturbations', {}))
  keys = [k for k in zeros if k[-1] == layer]
  if layer not in features or len(keys) != 1:
    raise ValueError(
      f'layer {layer!r} is not a named layer of {model.label()}; valid: '
      f'{", ".join(sorted(features))}'
    )
  anchor = jax.lax.stop_gradient(features[layer])

  def head_fn(a):
    batch = a.shape[0]
    zeros_b = {k: repeat_to(v, batch) for k, v in zeros.items()}
    perturbations = traverse_util.unflatten_dict(zeros_b | {keys[0]: a - repeat_to(anchor, batch)})
    return model.apply(variables | {'perturbations': perturbations}, repeat_to(x, batch))[0]

  return features[layer], head_fn


def _resolve(module, path: str):
  """(parent, key) of the attribute path 'a.b.3.c' on an NNX module; None if absent."""
  *parents, last = path.split('.')
  node = module
  try:
    for part in parents:
      node = node[int(part)] if part.isdigit() else getattr(node, part)
    if last.isdigit():
      node[int(last)]
    else:
      getattr(node, last)
  except (AttributeError, IndexError, KeyError, TypeError):
    return None
  return node, last


class _Tap:
  """Stands in for an NNX or Equinox submodule on a copy: calls it and passes its output (its
  first array when a tuple) to `edit`."""

  def __init__(self, inner, edit):
    self.inner, self.edit = inner, edit

  def __call__(self, *args, **kwargs):
    first, put_back = _first_array(self.inner(*args, **kwargs))
    return put_back(self.edit(first))


@dataclasses.dataclass(frozen=True)
class NNXModel:
  """Any Flax NNX module, explained at a submodule given by its attribute path.

  Variables are the module's state: `adapter, state = NNXModel.split(model)` (call
  `model.eval()` first for evaluation mode). Each call merges a fresh copy, so the user's
  module is never changed.
  """

  graphdef: Any
  output: Callable | None = None
  default_layer: str | None = None
  name: str = 'NNX model'
  filters: tuple = ()

  @classmethod
  def split(cls, module, *filters, **kwargs) -> tuple:
    """(adapter, state) of an NNX module, or with `filters` (`nnx.Param, ...`, as
    `nnx.split` takes them) (adapter, params, rest, ...): then `variables` is the tuple
    of those states, so a gradient can be taken over the parameters alone. kwargs as the
    fields (output, default_layer)."""
    graphdef, *states = nnx.split(module, *filters)
    return (cls(graphdef, name=type(module).__name__, filters=filters, **kwargs), *states)

  def label(self) -> str:
    return self.name

  def _logits(self, output) -> jax.Array:
    return (self.output or _logits_of)(output)

  def _merge(self, variables):
    """A fresh module from the state, or from the tuple of states `split` gave."""
    states = variables if isinstance(variables, tuple | list) else (variables,)
    return nnx.merge(self.graphdef, *states)

  def logits(self, variables, x: jax.Array) -> jax.Array:
    return self._logits(self._merge(variables)(x))

  def _tapped(self, module, layer: str, edit, variables, x):
    """Replaces the submodule at `layer` by a `_Tap` of it; returns a function undoing it."""
    found = _resolve(module, layer)
    if found is None:
      raise _unknown_layer(layer, self.label(), self.layers(variables, x))
    parent, key = found
    if key.isdigit():
      inner = parent[int(key)]
      parent[int(key)] = _Tap(inner, edit)
      return lambda: parent.__setitem__(int(key), inner)
    inner = getattr(parent, key)
    setattr(parent, key, _Tap(inner, edit))
    return lambda: setattr(parent, key, inner)

  def _run(self, variables, x, layer: str, edit) -> jax.Array:
    module = self._merge(variables)
    self._tapped(module, layer, edit, variables, x)
    return self._logits(module(x))

  def perturbed(self, variables, x: jax.Array, layer: str, delta=None, **call_kwargs):
    """(logits, the layer's output A, the state after the call) of one forward pass with
    `delta` added to A (None: nothing added), on a copy merged inside the caller's trace:
    BatchNorm statistics in train mode and dropout's RNG counters advance in the returned
    state (the states after the parameters when `split` had filters, else the whole
    state), never in the user's module. `call_kwargs` go to the module's `__call__`."""
    seen = []

    def edit(out):
      seen.append(out)
      return out if delta is None else out + delta.astype(out.dtype)

    module = self._merge(variables)
    restore = self._tapped(module, layer, edit, variables, x)
    logits = self._logits(module(x, **call_kwargs))
    restore()
    _, *states = nnx.split(module, *self.filters)
    state = tuple(states[1:]) if self.filters else states[0]
    if isinstance(state, tuple) and len(state) == 1:
      state = state[0]
    return logits, _called_once(layer, self.label(), seen), state

  def layers(self, variables, x: jax.Array) -> dict[str, tuple]:
    """{attribute path: output shape} of every submodule whose output is an NHWC or token
    array (shape inference only)."""
    module = nnx.merge(self.graphdef, variables)
    paths = ['.'.join(str(p) for p in path) for path, _ in nnx.iter_modules(module) if path]
    shapes = {}
    for path in paths:
      seen = []

      def record(out, seen=seen):
        seen.append(out)
        return out

      try:
        jax.eval_shape(lambda v, inputs, p=path, r=record: self._run(v, inputs, p, r), variables, x)
      except Exception:  # noqa: BLE001 - a container that is not called like a layer
        continue
      if len(seen) == 1 and isinstance(seen[0], jax.Array) and seen[0].ndim >= _MIN_LAYER_NDIM:
        shapes[path] = tuple(seen[0].shape)
    return shapes

  def features(self, variables, x: jax.Array, layer: str | None):
    layer = layer if layer is not None else self.default_layer
    seen = []

    def record(out):
      seen.append(out)
      return out

    self._run(variables, x, layer, record)
    value = _called_once(layer, self.label(), seen)
    run = lambda inputs, edit: self._run(variables, inputs, layer, edit)
    return value, _replaced_layer_head(run, x, value)

  def class_weights(self, variables):
    raise ValueError(f'CAM needs the class weights of our models; for {self.label()} use grad_cam')


@dataclasses.dataclass(frozen=True)
class FunctionsModel:
  """A model given as two pure functions: `features_fn(variables, x)` -> the explained
  layer's features (NHWC or tokens), `head_fn(variables, a)` -> logits, per sample."""

  features_fn: Callable
  head_fn: Callable
  default_layer: str | None = 'features'

  def label(self) -> str:
    return f'FunctionsModel({getattr(self.features_fn, "__name__", "features_fn")})'

  def logits(self, variables, x: jax.Array) -> jax.Array:
    return self.head_fn(variables, self.features_fn(variables, x))

  def layers(self, variables, x: jax.Array) -> dict[str, tuple]:
    return {'features': tuple(jax.eval_shape(self.features_fn, variables, x).shape)}

  def features(self, variables, x: jax.Array, layer: str | None):
    if layer not in (None, 'features'):
      raise _unknown_layer(layer, self.label(), self.layers(variables, x))
    return self.features_fn(variables, x), functools.partial(self.head_fn, variables)

  def perturbed(self, variables, x: jax.Array, layer: str | None, delta=None):
    """(logits, the features A, {}) with `delta` added to A (None: nothing added)."""
    a, head = self.features(variables, x, layer)
    return head(a if delta is None else a + delta.astype(a.dtype)), a, {}

  def class_weights(self, variables):
    raise ValueError(f'CAM needs the class weights of our models; for {self.label()} use grad_cam')


def equinox_or_none():
  """The equinox package, or None where it is not installed (it is optional)."""
  try:
    import equinox  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return equinox


def _at(node, path: str):
  """The node at attribute path 'a.b.3.c' (digits index sequences)."""
  for part in path.split('.'):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node


def _module_paths(node, prefix: str = '') -> list[str]:
  """Attribute paths of the submodules of an Equinox module (dataclass fields, recursively,
  through lists and tuples)."""
  eqx = equinox_or_none()
  paths = []
  children = []
  if dataclasses.is_dataclass(node):
    children = [(f.name, getattr(node, f.name, None)) for f in dataclasses.fields(node)]
  elif isinstance(node, list | tuple):
    children = [(str(i), child) for i, child in enumerate(node)]
  for name, child in children:
    path = f'{prefix}{name}'
    if isinstance(child, eqx.Module):
      paths.append(path)
    if isinstance(child, eqx.Module | list | tuple):
      paths.extend(_module_paths(child, path + '.'))
  return paths


@dataclasses.dataclass(frozen=True)
class EquinoxModel:
  """An Equinox module, explained at a submodule given by its attribute path (`'conv2'`,
  `'layers.3'`).

  `adapter, params = EquinoxModel.split(model)` partitions the module into its floating
  arrays (`params`, the variables: a gradient can be taken over them) and the rest
  (`static`, held here). Equinox layers take one sample, so by default the module is
  vmapped over the batch (`batched=True` for a module that takes the batch itself), and
  its conv maps are channels-first (`channels_first=True`: A is given NHWC, as every CAM
  method takes it). Stateful layers (`eqx.nn.BatchNorm` with `eqx.nn.State`) are not
  supported: use `FunctionsModel` for those. Jit with `eqx.filter_jit` when the module holds
  non-array leaves you pass as arguments, or close over the adapter, as here.
  """

  static: Any
  output: Callable | None = None
  default_layer: str | None = None
  batched: bool = False
  channels_first: bool = True
  name: str = 'Equinox model'

  @classmethod
  def split(cls, module, **kwargs) -> tuple['EquinoxModel', Any]:
    """(adapter, params) of an Equinox module; kwargs as the fields."""
    eqx = equinox_or_none()
    params, static = eqx.partition(module, eqx.is_inexact_array)
    return cls(static, name=type(module).__name__, **kwargs), params

  def label(self) -> str:
    return self.name

  def _module(self, variables):
    return equinox_or_none().combine(variables, self.static)

  def _nhwc(self, a):
    return jnp.moveaxis(a, -3, -1) if self.channels_first and a.ndim >= 3 else a

  def _native(self, a):
    return jnp.moveaxis(a, -1, -3) if self.channels_first and a.ndim >= 3 else a

  def logits(self, variables, x: jax.Array) -> jax.Array:
    module = self._module(variables)
    call = module if self.batched else jax.vmap(module)
    return (self.output or _logits_of)(call(x))

  def perturbed(self, variables, x: jax.Array, layer: str, delta=None):
    """(logits, the layer's output A (NHWC for conv maps), {}) of one forward pass with
    `delta` (NHWC) added to A (None: nothing added)."""
    eqx = equinox_or_none()
    module = self._module(variables)
    try:
      inner = _at(module, layer)
    except (AttributeError, IndexError, KeyError, TypeError):
      raise _unknown_layer(layer, self.label(), self.layers(variables, x)) from None

    def one(xi, di):
      seen = []

      def edit(out):
        seen.append(out)
        return out if di is None else out + self._native(di).astype(out.dtype)

      tapped = eqx.tree_at(lambda m: _at(m, layer), module, replace=_Tap(inner, edit))
      logits = (self.output or _logits_of)(tapped(xi))
      return logits, _called_once(layer, self.label(), seen)

    if self.batched:
      logits, a = one(x, delta)
    else:
      logits, a = jax.vmap(one, in_axes=(0, None if delta is None else 0))(x, delta)
    return logits, self._nhwc(a), {}

  def layers(self, variables, x: jax.Array) -> dict[str, tuple]:
    """{attribute path: output shape (NHWC)} of every submodule whose output, per batch, is
    a map or token array (shape inference only)."""
    shapes = {}
    for path in _module_paths(self._module(variables)):
      try:
        a = jax.eval_shape(lambda v, inputs, p=path: self.perturbed(v, inputs, p)[1], variables, x)
      except Exception:  # noqa: BLE001 - a container that is not called like a layer
        continue
      if a.ndim >= _MIN_LAYER_NDIM:
        shapes[path] = tuple(a.shape)
    return shapes

  def features(self, variables, x: jax.Array, layer: str | None):
    layer = layer if layer is not None else self.default_layer
    _, value, _ = self.perturbed(variables, x, layer)
    anchor = jax.lax.stop_gradient(value)

    def head_fn(a):
      delta = a - repeat_to(anchor, a.shape[0])
      return self.perturbed(variables, repeat_to(x, a.shape[0]), layer, delta)[0]

    return value, head_fn

  def class_weights(self, variables):
    raise ValueError(f'CAM needs the class weights of our models; for {self.label()} use grad_cam')


ADAPTERS = (LinenModel, NNXModel, FunctionsModel, EquinoxModel, ImportedModel)
for _adapter in ADAPTERS:
  # Static pytree nodes: a whole `split` result `(adapter, state)` can be a jitted argument.
  jax.tree_util.register_static(_adapter)


def states_of(variables):
  """`variables`, or, for a whole `NNXModel.split` / `EquinoxModel.split` result passed as
  them, what follows the adapter (its one state, or the tuple of states)."""
  if isinstance(variables, tuple) and variables and isinstance(variables[0], ADAPTERS):
    rest = variables[1:]
    return rest[0] if len(rest) == 1 else rest
  return variables


# What an adapter of one's own defines, on its class (an attribute `features` of a module,
# a submodule, does not make it one).
_ADAPTER_METHODS = ('logits', 'features', 'layers', 'label', 'class_weights')


def as_explained_model(model):
  """The adapter for `model`: one of ours -> CamModel, a linen module -> LinenModel, an
  adapter (`ADAPTERS`, or a class of one's own with their methods) as is. NNX and Equinox
  modules are split first (`NNXModel.split`, `EquinoxModel.split`; `Explainer` does it)."""
  if isinstance(model, models.CamClassifier):
    return CamModel(model)
  if isinstance(model, models.ImportedClassifier):
    return ImportedModel(model, {'train': False}, default_layer=model.layer_path())
  if isinstance(model, nn.Module):
    return LinenModel(model)
  if isinstance(model, ADAPTERS):
    return model
  eqx = equinox_or_none()
  if eqx is not None and isinstance(model, eqx.Module):
    raise TypeError(
      f'{type(model).__name__} is an Equinox module: split it first, '
      '`adapter, params = explain.EquinoxModel.split(model)`, and pass the adapter with '
      'params as the variables'
    )
  if isinstance(model, nnx.Module):
    raise TypeError(
      f'{type(model).__name__} is an NNX module: split it first, '
      '`adapter, state = explain.NNXModel.split(model)`, and pass the adapter with state as '
      'the variables'
    )
  if all(callable(getattr(type(model), name, None)) for name in _ADAPTER_METHODS):
    return model
  raise TypeError(
    f'cannot explain a {type(model).__name__}: give a Flax linen module, one of '
    'bcam_jax.models, an NNX or Equinox module split by explain.NNXModel.split / '
    'explain.EquinoxModel.split, or explain.FunctionsModel(features_fn, head_fn)'
  )


def token_grid(tokens: jax.Array, head_fn, prefix_tokens: int = 1):
  """ViT token features `(N, L, D)` as an NHWC map and the head on it.

  The first `prefix_tokens` tokens (the class token, and any register tokens) are dropped
  from the map and held fixed in the head; the other `L - prefix_tokens` must be a square
  grid of patches in row-major order, as a ViT's patch embedding makes them. Returns
  (grid `(N, s, s, D)`, head_fn on grids), the reshape pytorch-grad-cam asks its users to
  write as `reshape_transform`.
  """
  n, length, dim = tokens.shape
  side = math.isqrt(max(length - prefix_tokens, 0))
  if side * side != length - prefix_tokens or side == 0:
    raise ValueError(
      f'token features of shape {tokens.shape} with prefix_tokens={prefix_tokens} leave '
      f'{length - prefix_tokens} patch tokens, not a square grid; set prefix_tokens to the '
      'number of class and register tokens before the patches'
    )
  prefix = tokens[:, :prefix_tokens]

  def grid_head(a):
    patches = a.reshape(a.shape[0], side * side, dim)
    return head_fn(jnp.concatenate([repeat_to(prefix, a.shape[0]), patches], axis=1))

  return tokens[:, prefix_tokens:].reshape(n, side, side, dim), grid_head
