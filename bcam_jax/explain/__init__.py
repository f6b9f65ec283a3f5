"""Post-hoc explanation of a trained classifier: saliency maps by method name for any named
layer, under jit, and their faithfulness.

  layers        `layer_features`: a named layer's features and the rest of the network
                as a function of them, so every gradient method explains any layer.
  methods       the method registry (`REGISTRY`, `METHODS`): name -> pure function giving
                the maps, with what it needs of the model (`check_applicable`).
  explainer     `Explainer`: a model with its input normalisation, mapping [0, 1] pixels
                to logits and to maps at image size in [0, 1].
  faithfulness  Average Drop / Gain / Increase, insertion and deletion, ROAD of such maps.
  sanity        the model-parameter randomisation test: do the maps change when the
                model's weights are randomised, layer by layer?

The map functions themselves live in `bcam_jax.cam`. This package never imports the
training code (objective, steps, train_lib, evaluation), so any trained model can be explained
without it.
"""

from bcam_jax.explain import faithfulness, sanity
from bcam_jax.explain.explainer import TARGETS, Explainer
from bcam_jax.explain.layers import layer_features
from bcam_jax.explain.methods import (
  METHODS,
  REGISTRY,
  Method,
  check_applicable,
  check_methods,
  default_methods,
)

__all__ = [
  'METHODS',
  'REGISTRY',
  'TARGETS',
  'Explainer',
  'Method',
  'check_applicable',
  'check_methods',
  'default_methods',
  'faithfulness',
  'layer_features',
  'sanity',
]
