"""Post-hoc explanation of a trained classifier: saliency maps by method name for any named
layer, under jit, and their faithfulness.

  - `layers`: a layer of any model (ours, Flax linen, Flax NNX, Equinox, a pair of pure
    functions) as features plus the rest of the network as a function of them, so every
    gradient method explains any layer of any model.
  - `methods`: the method registry (`REGISTRY`, `METHODS`): name -> pure function giving
    the maps, with what it needs of the model (`check_applicable`).
  - `explainer`: `Explainer`: a model with its input normalisation, mapping [0, 1] pixels
    to logits and to maps at image size in [0, 1].
  - `faithfulness`: Average Drop / Gain / Increase, insertion and deletion, ROAD of such maps.
  - `sanity`: the model-parameter randomisation test: do the maps change when the
    model's weights are randomised, layer by layer?
  - `overlay`: maps blended over their images as RGB arrays (`show_cam_on_image`).
  - the methods that need the whole network rather than one layer's features: `guided`
    (guided backpropagation, the model's ReLUs guided while it is traced), `fullgrad`
    (FullGrad, every Conv and BatchNorm bias of a linen model), `sess` (SESS, any method
    over scales and sliding windows) and `legrad` (LeGrad, every block's attention of our
    ViTs).

The map functions themselves live in `bcam_jax.cam`. This package never imports the
training code (objective, steps, train_lib, evaluation), so any trained model can be explained
without it.
"""

from bcam_jax.explain import faithfulness, sanity
from bcam_jax.explain.explainer import TARGETS, Explainer, TargetSpec
from bcam_jax.explain.layers import (
  CamModel,
  EquinoxModel,
  FunctionsModel,
  LinenModel,
  NNXModel,
  layer_features,
  token_grid,
)
from bcam_jax.explain.methods import (
  METHODS,
  REGISTRY,
  Method,
  check_applicable,
  check_methods,
  default_methods,
)
from bcam_jax.explain.overlay import colorize, show_cam_on_image

__all__ = [
  'METHODS',
  'REGISTRY',
  'TARGETS',
  'CamModel',
  'EquinoxModel',
  'Explainer',
  'FunctionsModel',
  'LinenModel',
  'Method',
  'NNXModel',
  'TargetSpec',
  'check_applicable',
  'check_methods',
  'colorize',
  'default_methods',
  'faithfulness',
  'layer_features',
  'sanity',
  'show_cam_on_image',
  'token_grid',
]
