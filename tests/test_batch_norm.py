"""The BatchNorm forms of `bcam_jax.models.batch_norm` against `flax.linen.BatchNorm` (the
"flax" form, and the reference), finite differences, and the residuals they save."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals
from jax.test_util import check_grads

from bcam_jax import models
from bcam_jax.models import batch_norm
from tests.numerics import assert_trees_close

SHAPE = (6, 5, 5, 8)  # NHWC; statistics over 150 values per channel
OTHER_FORMS = [f for f in batch_norm.BATCH_NORMS if f != 'flax']
# Normwise relative differences from the flax module, measured: float64 <= 1e-15, float32
# <= 5e-7 (fast variance and the hand-written backward sum in other orders).
RTOL = {'float64': 1e-12, 'float32': 5e-6}


def _inputs(dtype):
  """An input whose channels' means are not small against their spreads, and parameters
  away from their initial values, so every term of the backward pass counts."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(SHAPE) * rng.uniform(0.5, 3.0, SHAPE[-1]) + rng.uniform(-4, 4, 8)
  params = {'scale': rng.uniform(0.5, 1.5, 8), 'bias': rng.uniform(-1, 1, 8)}
  stats = {'mean': rng.uniform(-1, 1, 8), 'var': rng.uniform(0.5, 2.0, 8)}
  cotangent = rng.standard_normal(SHAPE)
  as_jnp = lambda tree, dt: jax.tree.map(lambda a: jnp.asarray(a, dt), tree)
  # Parameters and statistics stay float32 as flax keeps them, except in a float64 model.
  kept = jnp.float64 if dtype == 'float64' else jnp.float32
  return as_jnp(x, dtype), as_jnp(params, kept), as_jnp(stats, kept), as_jnp(cotangent, dtype)


def _results(form, dtype):
  """Train-mode output, updated statistics and the gradients of a loss that uses both; the
  eval-mode output."""
  x, params, stats, cotangent = _inputs(dtype)
  module = batch_norm.batch_norm(form, train=True, momentum=0.9, epsilon=1e-5, dtype=dtype)

  def loss(params, x):
    y, new = module.apply({'params': params, 'batch_stats': stats}, x, mutable=['batch_stats'])
    new = new['batch_stats']
    return jnp.sum(y * cotangent) + jnp.sum(3.0 * new['mean'] - 2.0 * new['var']), (y, new)

  (_, (y, new_stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
  evaluation = batch_norm.batch_norm(form, train=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
  y_eval = evaluation.apply({'params': params, 'batch_stats': stats}, x)
  return {'y': y, 'stats': new_stats, 'grads': grads, 'y_eval': y_eval}


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
@pytest.mark.parametrize('form', OTHER_FORMS)
def test_each_form_equals_flax_batchnorm(form, dtype):
  with jax.enable_x64(dtype == 'float64'):
    got, want = _results(form, dtype), _results('flax', dtype)
    assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
    assert_trees_close(got, want, RTOL[dtype], f'{form} {dtype}')


def test_custom_vjp_backward_matches_finite_differences():
  """The hand-written backward pass (of the output and of both statistics) against central
  differences in float64: a reference independent of flax and of autodiff."""
  with jax.enable_x64(True):
    x, params, _, _ = _inputs('float64')
    scale, bias = params['scale'], params['bias']
    fn = lambda x, s, b: batch_norm.normalize_batch(x, s, b, 1e-5, (0, 1, 2), jnp.float64)
    check_grads(fn, (x, scale, bias), order=1, modes=['rev'], eps=1e-6, atol=1e-6, rtol=1e-6)


def _full_size_residuals(form):
  x = jnp.asarray(_inputs('float32')[0], jnp.bfloat16)
  module = batch_norm.batch_norm(form, train=True, momentum=0.9, epsilon=1e-5, dtype=x.dtype)
  variables = module.init(jax.random.key(0), x)

  def loss(params, x):
    y, _ = module.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, mutable=['batch_stats']
    )
    return jnp.sum(y.astype(jnp.float32))

  return [r.dtype for r, _ in saved_residuals(loss, variables['params'], x) if r.shape == SHAPE]


def test_custom_vjp_saves_only_the_bfloat16_input_for_the_backward_pass():
  """What the hypothesis "BatchNorm memory traffic" is about: flax's autodiff keeps float32
  copies of the activation (x - mean, twice) for the backward pass of a bfloat16 model; the
  custom_vjp form keeps the bfloat16 input alone."""
  assert _full_size_residuals('custom_vjp') == [jnp.bfloat16]
  assert _full_size_residuals('flax') == [jnp.float32, jnp.float32]


def _resnet_step(form):
  """Loss, gradients and new batch statistics of a float64 ResNet18 (width 4) training
  forward, with a loss on the logits and on the CAM features (the path Grad-CAM uses)."""
  model = models.get_model('resnet18', 10, width=4, dtype=jnp.float64, batch_norm=form)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 16, 16, 1)) + 0.5, jnp.float64)
  labels = jnp.asarray([0, 3, 7, 3])
  variables = models.init_variables(model, jax.random.key(0), 16)
  variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)

  def loss(params):
    (logits, features), new = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(2)},
    )
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return ce + jnp.mean(features['cam'] ** 2), new['batch_stats']

  (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return variables, {'loss': value, 'grads': grads, 'batch_stats': stats}


@pytest.mark.parametrize('form', OTHER_FORMS)
def test_resnet18_trains_the_same_with_every_batch_norm(form):
  with jax.enable_x64(True):
    (want_vars, want), (got_vars, got) = _resnet_step('flax'), _resnet_step(form)
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert shapes(got_vars) == shapes(want_vars)  # one checkpoint layout for every form
  assert_trees_close(got_vars, want_vars, 0.0, 'initial variables')
  assert_trees_close(got, want, RTOL['float64'], form)


def test_batch_norm_option_is_validated_and_listed():
  assert models.model_option_defaults('resnet18')['batch_norm'] == 'flax'
  with pytest.raises(ValueError, match=r"batch_norm must be one of \('flax', .*got 'fused'"):
    models.get_model('resnet18', 10, batch_norm='fused')
  assert isinstance(
    batch_norm.batch_norm('flax', train=True, momentum=0.9, epsilon=1e-5, dtype=None),
    nn.BatchNorm,
  )
