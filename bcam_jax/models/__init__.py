"""Classifiers for explanation-guided training, and helpers to build and size them.

Each model is a Flax linen module (see ``bcam_jax.models.base``):
``model.apply(variables, x, train=...)`` returns ``(logits, features)``;
``method='backbone'`` maps images to the features dict (``features['cam']`` is
the Grad-CAM layer) and ``method='head'`` maps the CAM map to logits (float32;
float64 for a float64 model), strictly per sample.  Variables are
``{'params': ..., 'batch_stats': ...}``
(batch_stats only for the ResNets); with ``train=True`` pass
``mutable=['batch_stats']`` and ``rngs={'dropout': key}``.

CAM map sizes (default options; ``load_pretrained`` builds the ImageNet stems)::

    model              28x28     112x112     224x224
    simple_cnn         7x7x64    28x28x64    56x56x64
    resnet18, 34       4x4x512   14x14x512   28x28x512   (stem="imagenet": 7x7x512 at 224)
    resnet50, 101      4x4x2048  14x14x2048  28x28x2048  (stem="imagenet": 7x7x2048 at 224)
    convnext_v2_tiny   3x3x768   14x14x768   28x28x768   (stem_stride=4: 7x7x768 at 224)
    convnext_tiny      3x3x768   14x14x768   28x28x768   (stem_stride=4: 7x7x768 at 224)
    vit_s16            1x1x384   7x7x384     14x14x384
    vit_b16            1x1x768   7x7x768     14x14x768

``load_pretrained`` (``bcam_jax.models.pretrained``) gives a model and variables from
torchvision's or timm's published weights.

The model modules document the other options' sizes and parameter counts.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from bcam_jax.models.base import CamClassifier
from bcam_jax.models.convnext import ConvNeXtTiny, ConvNeXtV2Tiny
from bcam_jax.models.imported import ImportedClassifier as ImportedClassifier
from bcam_jax.models.imported import import_model, is_import_path
from bcam_jax.models.pretrained import PRETRAINED_NAMES as PRETRAINED_NAMES
from bcam_jax.models.pretrained import WeightsError as WeightsError
from bcam_jax.models.pretrained import load_pretrained as load_pretrained
from bcam_jax.models.resnet import ResNet18, ResNet34, ResNet50, ResNet101
from bcam_jax.models.simple_cnn import SimpleCNN
from bcam_jax.models.vit import ViTB16, ViTS16

_MODELS = {
  'simple_cnn': SimpleCNN,
  'resnet18': ResNet18,
  'resnet34': ResNet34,
  'resnet50': ResNet50,
  'resnet101': ResNet101,
  'convnext_v2_tiny': ConvNeXtV2Tiny,
  'convnext_tiny': ConvNeXtTiny,
  'vit_s16': ViTS16,
  'vit_b16': ViTB16,
}
MODEL_NAMES = tuple(_MODELS)

# Dataclass fields of every model that are not options of get_model.
_NOT_OPTIONS = ('num_classes', 'parent', 'name', 'head_type', 'pooling', 'conv_lowering')


def _model_class(name: str) -> type[CamClassifier]:
  if name not in _MODELS:
    raise ValueError(f'unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)}')
  return _MODELS[name]


def model_options(name: str) -> tuple[str, ...]:
  """Names of the options ``get_model`` accepts for model ``name``."""
  return tuple(model_option_defaults(name))


def model_option_defaults(name: str) -> dict[str, bool | int | float | str]:
  """The options of model ``name`` with their default values as a config holds them (a
  dtype by its name, e.g. ``"float32"``): what ``config.model.options`` means when it leaves
  an option out."""
  fields = dataclasses.fields(_model_class(name))
  return {
    f.name: f.default
    if isinstance(f.default, bool | int | float | str)
    else jnp.dtype(f.default).name
    for f in fields
    if f.name not in _NOT_OPTIONS
  }


def get_model(
  name: str,
  num_classes: int,
  *,
  head: str = 'default',
  pooling: str = 'default',
  conv_lowering: str = 'auto',
  **options,
) -> CamClassifier:
  """Build model ``name`` with ``num_classes`` outputs and its options.

  ``head="softcam"`` gives the Soft-CAM evidence head, ``pooling="ca_stream"`` the
  CA-Stream attention pooling (``bcam_jax.models.heads``); both work on every backbone.
  ``conv_lowering`` (``conv.LOWERINGS``: "auto", "xla", "shifted_matmul", "chunked_grad",
  "auto_xla_grad") picks how convolutions lower
  (``bcam_jax.models.conv``); it changes speed only, never the parameters.

  ``dtype`` may be given as a string (e.g. ``"bfloat16"``).  Unknown names
  and options raise ValueError listing the valid ones.
  """
  cls = _model_class(name)
  valid = model_options(name)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(
      f'unknown option(s) {", ".join(unknown)} for model {name!r}; '
      f'valid options: {", ".join(valid)}'
    )
  if isinstance(options.get('dtype'), str):
    options['dtype'] = jnp.dtype(options['dtype'])
  return cls(num_classes, head_type=head, pooling=pooling, conv_lowering=conv_lowering, **options)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model: its name (`models.MODEL_NAMES`, or `package.module:ClassName` for a linen
  model of your own, `models.imported`), head ('default' | 'softcam'), pooling ('default' |
  'ca_stream'), convolution lowering (speed only, `models.conv`), its options
  (`models.model_options`, left out: their defaults; an imported model's constructor
  arguments besides num_classes), whether only the CA-Stream parameters train (the stream on
  a frozen backbone, CA-Stream's protocol) and an imported model's CAM layer (a submodule
  path)."""

  name: str = 'simple_cnn'
  head: str = 'default'
  pooling: str = 'default'
  conv_lowering: str = 'auto'
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  freeze_backbone: bool = False
  cam_layer: str = ''

  @classmethod
  def from_config(cls, model_config) -> 'ModelSpec':
    """The spec of `config.model`."""
    return cls(
      name=model_config.name,
      head=model_config.head,
      pooling=model_config.pooling,
      conv_lowering=model_config.conv_lowering,
      options=dict(model_config.options),
      freeze_backbone=bool(model_config.ca_stream.freeze_backbone),
      cam_layer=model_config.cam_layer,
    )

  def build(self, num_classes: int, dtype: Any = jnp.float32) -> CamClassifier:
    """The model with `num_classes` outputs computing in `dtype`; ValueError naming an
    unknown or invalid option; for a model by import path (`imported`), ImportError,
    TypeError or ValueError naming the path."""
    if is_import_path(self.name):
      return import_model(self.name, num_classes, dict(self.options), self.cam_layer, dtype)
    return get_model(
      self.name,
      num_classes,
      head=self.head,
      pooling=self.pooling,
      conv_lowering=self.conv_lowering,
      **({'dtype': dtype} | dict(self.options)),
    )

  def baseline(self, num_classes: int, dtype: Any = jnp.float32) -> CamClassifier:
    """This model with the default head and pooling: the run whose backbone and classifier
    start a CA-Stream or Soft-CAM one (`config.init_from`)."""
    return dataclasses.replace(self, head='default', pooling='default').build(num_classes, dtype)


def head_fn(model: CamClassifier, variables, features: dict):
  """The per-sample head as a pure function of the CAM features: a -> logits, with the
  head's per-sample second input (CA-Stream's query, a ViT's class token) taken from
  ``features``."""
  query = model.head_query(features)
  return lambda a: model.apply(variables, a, query, method='head')


def _image(image_size: int, channels: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)


def cam_shape(model: CamClassifier, image_size: int, channels: int = 1) -> tuple[int, int, int]:
  """(h, w, k) of the CAM map for square images of side ``image_size`` with ``channels``
  channels; shape inference only."""

  def init_features(x):
    (_, features), _ = model.init_with_output(jax.random.key(0), x, train=False)
    return features

  return tuple(jax.eval_shape(init_features, _image(image_size, channels))['cam'].shape[1:])


def init_variables(
  model: CamClassifier, rng: jax.Array, image_size: int, channels: int = 1
) -> dict:
  """Initial variables ({'params', 'batch_stats'?}) for square images of side ``image_size``
  with ``channels`` channels (the first convolution's input depth), without the zero
  ``perturbations`` that ``init`` also creates.

  Jitted, so XLA drops the forward pass that ``init`` traces: only the
  initialisers run.
  """
  images = jnp.zeros(_image(image_size, channels).shape, jnp.float32)
  variables = jax.jit(lambda key: model.init(key, images, train=False))(rng)
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}


def param_count(params) -> int:
  """Number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
