"""A named layer of a model as features plus the rest of the network as a function of them.

Every gradient method of `bcam_jax.cam` takes a layer's features `A` and a per-sample
`head_fn` mapping `A` to logits; `layer_features` builds both for the CAM layer or for any
other key of the backbone's features dict.
"""

import jax
from flax import traverse_util

from bcam_jax import models


def layer_features(model, variables, x: jax.Array, layer: str = 'cam'):
  """(features of `layer` `(N, h, w, K)`, head_fn mapping them to logits `(N, C)`).

  For 'cam' head_fn is the model's head. For another layer it runs the whole model with
  `a - A` added at that layer through Flax perturbations, so its value is the model's
  logits at a = A and its VJP there is d logits / d layer, per sample (evaluation mode has
  no batch coupling).
  """
  if layer == 'cam':
    features = model.apply(variables, x, method='backbone')
    return features['cam'], models.head_fn(model, variables, features)
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
    perturbations = traverse_util.unflatten_dict(zeros | {keys[0]: a - anchor})
    return model.apply(variables | {'perturbations': perturbations}, x)[0]

  return features[layer], head_fn
