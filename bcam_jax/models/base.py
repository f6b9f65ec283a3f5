"""Shared structure of the classifiers: a backbone ending at the Grad-CAM layer, a per-sample head.

Every model is a Flax linen module with three entry points, each usable as a
pure function through ``model.apply(variables, ..., method=...)``:

* ``__call__(x, train=False)`` -> ``(logits, features)``;
* ``backbone(x, train=False)``: images ``(N, H, W, 1)`` -> ``features``, a dict
  of named NHWC stage outputs that includes ``"cam"``, the Grad-CAM target
  layer (the last conv feature map).  All BatchNorm, dropout and stochastic
  depth live here;
* ``head(cam)``: ``features["cam"]`` -> float32 logits ``(N, num_classes)``.

Every stage output of the features dict except a separate ``"cam"`` goes
through ``self.perturb(name, ...)`` (a no-op unless a ``perturbations``
collection is passed), so that ``bcam_jax.explain.layer_features`` can take
gradients of the class scores with respect to any named layer.

The head is strictly per-sample (no batch statistics, no randomness), so one
``jax.vjp`` of it gives the exact per-sample gradients of the class scores
with respect to the CAM layer, which is what Grad-CAM inside training needs.
The head is also cheap, so it always computes in float32 whatever the
``dtype`` option: given a float32 CAM map its gradients are float32 too.
"""
import itertools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class CamClassifier(nn.Module):
    """Base class of the models: the three entry points and the image-size check.

    Subclasses create ``backbone_net`` (images, train -> features dict) and
    ``head_net`` (cam -> float32 logits) in ``setup`` and define ``cam_side``
    and ``label``.

    Attributes:
      num_classes: number of output classes.
      dtype: compute dtype of the backbone (e.g. ``jnp.bfloat16``); parameters
        stay float32, normalisations compute in float32, and the head computes
        in float32.
    """

    num_classes: int
    dtype: Any = jnp.float32

    def __post_init__(self):
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f'num_classes must be a positive int, got {self.num_classes!r}')
        super().__post_init__()

    @nn.nowrap
    def cam_side(self, image_side: int) -> int:
        """Side of the CAM map for an image side, by the layers' size arithmetic."""
        raise NotImplementedError(f'{type(self).__name__} must define cam_side')

    @nn.nowrap
    def label(self) -> str:
        """Model name with the options that change its sizes, for error messages."""
        raise NotImplementedError(f'{type(self).__name__} must define label')

    @nn.nowrap
    def min_image_side(self) -> int:
        """Smallest image side that gives at least a 1x1 CAM map."""
        return next(s for s in itertools.count(1) if self.cam_side(s) >= 1)

    @nn.nowrap
    def check_image_size(self, height: int, width: int) -> None:
        """Raise ValueError if a ``height x width`` image gives an empty CAM map."""
        if min(self.cam_side(height), self.cam_side(width)) < 1:
            side = self.min_image_side()
            raise ValueError(
                f'{self.label()}: image size {height}x{width} is too small; it needs at '
                f'least {side}x{side} to give a 1x1 CAM map')

    @nn.nowrap
    def class_weights(self, params) -> Any:
        """The dense kernel ``(K, num_classes)`` of a global-average-pool + dense head, which
        CAM (``bcam_jax.cam.cam``) needs; ValueError for any other head."""
        raise ValueError(f'{self.label()} has no global-average-pool + dense head, so CAM does '
                         'not apply to it; use grad_cam, grad_cam_pp or score_cam')

    def backbone(self, x, train: bool = False):
        """Images (N, H, W, 1) -> dict of NHWC stage outputs, with "cam" the Grad-CAM layer."""
        self.check_image_size(x.shape[1], x.shape[2])
        return self.backbone_net(x, train=train)

    def head(self, cam):
        """CAM feature map (N, h, w, k) -> float32 logits (N, num_classes), per sample."""
        return self.head_net(cam)

    def __call__(self, x, train: bool = False):
        """Images -> (logits, features); logits are float32."""
        features = self.backbone(x, train=train)
        return self.head(features['cam']), features
