"""The Batch-CAM losses of any model, as a differentiable function of its variables.

`cam_loss(model, variables, images, labels, prototypes)` gives the Prototype Loss (`kind=
'proto'`, eq. 11) or the Batch-CAM Prototype Loss (`kind='bcpl'`, eq. 12) of the model's
Grad-CAM at `layer`, with the logits of the same forward pass, so a training loss is

    out = cam_loss(model, variables, images, labels, prototypes, layer='Conv_2')
    loss = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()
    loss += lambda_cam * out.term

`model` is what `bcam_jax.explain.Explainer` takes: one of `bcam_jax.models`, a Flax linen
module (the layer a submodule path), an NNX module's adapter (`explain.NNXModel.split`, the
layer an attribute path) or `explain.FunctionsModel`. One forward pass and one backward pass
give A and G: the layer's output is intercepted and a zero perturbation added to it, so the
logits are the model's own and G = dS_y/dA is the VJP at that perturbation (not a second
forward pass from the input); the loss differentiates through both (second order through
G). Our models take their fast path (backbone, then one VJP of the per-sample head), the one
train.py uses. Train-mode options pass through to the model (`train=True`,
`mutable=['batch_stats']`, `rngs={'dropout': key}` for linen; the module's own mode and
RNG streams for NNX) and the new state comes back in `updates`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bcam_jax import cam, objective
from bcam_jax.explain import layers as layers_lib

KINDS = ('proto', 'bcpl')


class CamLoss(NamedTuple):
  """The CAM term (a scalar), the logits `(N, C)` of the forward pass that gave it, and
  the model state that pass changed: linen's mutated collections ({} without `mutable`),
  the NNX state after the call."""

  term: jax.Array
  logits: jax.Array
  updates: Any


def _zoo_explanation(model, variables, images, labels, apply_kwargs):
  """(logits, explanation, updates) of one of our models at its CAM layer: its backbone,
  then one VJP of its head (Soft-CAM: the evidence map of the label)."""
  mutable = apply_kwargs.get('mutable')
  variables = {k: v for k, v in variables.items() if k != 'perturbations'}
  out = model.apply(variables, images, method='backbone', **apply_kwargs)
  features, updates = out if mutable else (out, {})
  logits, explanation, _ = objective.logits_and_explanation(
    model, variables, features, labels, explain=True
  )
  return logits, explanation, updates


def layer_gradients(model, variables, images, labels, *, layer=None, **apply_kwargs):
  """(logits `(N, C)`, the layer's output A, G = d sum_i S_{i, y_i} / dA, updates) from
  one forward and one backward pass of any model (`cam_loss` says which). G is per
  sample where nothing after the layer mixes samples (BatchNorm in evaluation mode); with
  train-mode BatchNorm after the layer it is the gradient of the batch's label scores."""
  adapter = layers_lib.as_explained_model(model)
  variables = layers_lib.states_of(variables)
  layer = layer if layer is not None else adapter.default_layer
  if layer is None:
    raise ValueError(f'name the layer of {adapter.label()} to explain: layer=<path>')
  # The variables enter each traced function as an argument, not a closure: an NNX module
  # merged from them may then change its state (BatchNorm statistics, RNG counters) there.
  run = lambda v, delta: adapter.perturbed(v, images, layer, delta, **apply_kwargs)
  shape = jax.eval_shape(lambda v: run(v, None)[1], variables)
  zeros = jnp.zeros(shape.shape, shape.dtype)

  def forward(delta, v):
    logits, a, updates = run(v, delta)
    return logits, (a, updates)

  # The variables' cotangent is not used (under jit, XLA drops its computation).
  logits, vjp, (a, updates) = jax.vjp(forward, zeros, variables, has_aux=True)
  grads, _ = vjp(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype))
  return logits, a, grads, updates


def cam_loss(
  model,
  variables,
  images: jax.Array,
  labels: jax.Array,
  prototypes: jax.Array,
  *,
  kind: str = 'bcpl',
  metric: str = 'l1',
  layer: str | None = None,
  cam_gradient: str = 'full',
  **apply_kwargs,
) -> CamLoss:
  """The CAM term of `kind` ('proto' | 'bcpl') of `model` at `layer` on a batch, with its
  logits and state updates (module docstring).

  images: the model's input (normalised as it expects); labels `(N,)` int; prototypes
  `(C, S, S)` in [0, 1], one per class (C the number of classes, S the side the maps are
  upsampled to before comparison); metric: 'l1' | 'l2' | 'ssim'; layer: None for the
  model's default (our models' 'cam'); cam_gradient: 'full', or 'through_features' to hold
  G constant. The layer must give NHWC maps `(N, h, w, K)`; a ViT's tokens go through
  `explain.FunctionsModel` with `explain.token_grid`.
  """
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r}; valid: {KINDS} (cross-entropy alone needs no CAM term)')
  if prototypes.ndim != 3 or prototypes.shape[1] != prototypes.shape[2]:
    raise ValueError(f'prototypes of shape {prototypes.shape}; expected (classes, S, S)')
  adapter = layers_lib.as_explained_model(model)
  variables = layers_lib.states_of(variables)
  layer = layer if layer is not None else adapter.default_layer
  if isinstance(adapter, layers_lib.CamModel) and layer == 'cam':
    merged = adapter.apply_kwargs | apply_kwargs
    logits, explanation, updates = _zoo_explanation(
      adapter.module, variables, images, labels, merged
    )
  else:
    logits, a, grads, updates = layer_gradients(
      adapter, variables, images, labels, layer=layer, **apply_kwargs
    )
    if a.ndim != 4:
      raise ValueError(
        f'layer {layer!r} of {adapter.label()} gives shape {a.shape}; the CAM losses need '
        'NHWC maps (N, h, w, K): for ViT tokens use explain.FunctionsModel with '
        'explain.token_grid'
      )
    explanation = objective.GradCamExplanation(a, grads)
  spec = objective.Objective(
    kind=kind,
    metric=metric,
    num_classes=prototypes.shape[0],
    prototype_size=prototypes.shape[-1],
    cam_gradient=cam_gradient,
  )
  term = spec.cam_term(explanation, labels, cam.at_least_float32(prototypes))
  return CamLoss(term, logits, updates)
