"""Guided backpropagation (Springenberg et al. 2015) of any model, without changing it.

The gradient of the target score with respect to the model's input, with every ReLU's
backward pass guided: a gradient passes a ReLU only where both its input and the incoming
gradient are positive, so the result shows the input patterns that raise the score.
pytorch-grad-cam's `GuidedBackpropReLUModel` swaps the model's `torch.nn.ReLU` modules; a
JAX model calls ReLU as a function, so here the function is swapped while the model is traced:
`jax.nn.relu` and the same function under `flax.linen`, `flax.linen.activation` and
`flax.nnx` (Flax re-exports it; Equinox models call `jax.nn.relu`). A model whose ReLU is
reached another way (`from jax.nn import relu` at import time, `jnp.maximum(x, 0)`) is not
guided; `guided_gradients` then raises, rather than returning plain gradients.
"""

import contextlib
import sys

import jax
import jax.numpy as jnp

from bcam_jax import cam

# The attributes through which models reach jax.nn.relu at call time, and the function
# itself (the guided ReLU's forward, which must not reach the swapped attribute).
_RELU_HOMES = ('jax.nn', 'flax.linen', 'flax.linen.activation', 'flax.nnx')
_PLAIN_RELU = jax.nn.relu


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
  """ReLU whose backward pass keeps a gradient only where input and gradient are positive."""
  return _PLAIN_RELU(x)


def _guided_forward(x):
  return _PLAIN_RELU(x), x


def _guided_backward(x, g):
  return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_forward, _guided_backward)


@contextlib.contextmanager
def _guided_relus(calls: list):
  """Within the block, the ReLU of every `_RELU_HOMES` module is `guided_relu`, each call
  counted in `calls`."""

  def counted(x):
    calls.append(x.shape)
    return guided_relu(x)

  homes = [sys.modules[name] for name in _RELU_HOMES if name in sys.modules]
  saved = [(home, home.relu) for home in homes if getattr(home, 'relu', None) is _PLAIN_RELU]
  try:
    for home, _ in saved:
      home.relu = counted
    yield
  finally:
    for home, relu in saved:
      home.relu = relu


def guided_gradients(logits_fn, x: jax.Array, targets) -> jax.Array:
  """Guided backpropagation `(N, H, W, C)`: d(target score)/d(x) of `logits_fn(x) -> (N, C)`
  (per sample) at the model input `x`, through guided ReLUs, for every sample in one VJP.
  `targets` as `bcam_jax.cam` takes them (class indices or a per-sample callable).
  ValueError when `logits_fn` calls no ReLU that can be guided."""
  calls = []
  with _guided_relus(calls):
    scores, vjp = jax.vjp(lambda v: cam.target_scores(logits_fn(v), targets), x)
  if not calls:
    raise ValueError(
      'guided backpropagation found no ReLU to guide: the model must call jax.nn.relu '
      '(nn.relu in Flax) at run time'
    )
  (grads,) = vjp(jnp.ones_like(scores))
  return grads


def saliency(grads: jax.Array) -> jax.Array:
  """A map `(N, H, W)` of input gradients `(N, H, W, C)`: the largest |gradient| over the
  channels (Simonyan et al. 2014), so the gradient images can be scored as maps."""
  return jnp.max(jnp.abs(cam.at_least_float32(grads)), axis=-1)
