"""Tests of the convolution lowerings and the slice max-pool (bcam_jax.models.conv, .pooling).

References: `lax.conv_general_dilated` and `flax.linen.max_pool`, values and gradients;
finite differences for the shifted-matmul form; whole models under either lowering.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from bcam_jax import parallel
from bcam_jax.config_validation import ConfigError, validate_config
from bcam_jax.configs import base
from bcam_jax.models import conv, get_model, init_variables
from bcam_jax.models.pooling import max_pool
from tests import numerics

_DN = ('NHWC', 'HWIO', 'NHWC')

# (input side, kernel, stride, padding, groups): every form the models use, on the map sizes
# where "auto" switches (1-4), on odd sides, and larger.
CASES = [
  (1, 3, 1, 1, 1),
  (2, 3, 1, 1, 1),
  (3, 3, 1, 1, 1),
  (4, 3, 1, 1, 1),
  (7, 3, 1, 1, 1),
  (2, 3, 2, 1, 1),
  (3, 3, 2, 1, 1),
  (4, 3, 2, 1, 1),
  (7, 3, 2, 1, 1),  # strided 3x3
  (3, 1, 2, 0, 1),
  (4, 1, 2, 0, 1),
  (7, 1, 2, 0, 1),  # 1x1 shortcuts
  (9, 7, 2, 3, 1),
  (5, 7, 2, 3, 1),  # ImageNet stem
  (6, 3, 1, 'SAME', 1),
  (5, 3, 2, 'SAME', 1),  # SimpleCNN
  (7, 2, 2, 'VALID', 1),
  (3, 2, 2, 'VALID', 1),
  (8, 4, 4, 'VALID', 1),  # patchify
  (1, 7, 1, 3, 'depthwise'),
  (3, 7, 1, 3, 'depthwise'),
  (8, 7, 1, 3, 'depthwise'),
]


def _padding(p):
  return p if isinstance(p, str) else ((p, p), (p, p))


def _operands(side, kernel, groups, channels=6, out=5, batch=3, seed=0):
  rng = np.random.default_rng(seed)
  groups = channels if groups == 'depthwise' else groups
  out = channels if groups == channels else out
  x = jnp.asarray(rng.standard_normal((batch, side, side, channels)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, channels // groups, out)), jnp.float32)
  return x, w, groups


@pytest.mark.parametrize('side,kernel,stride,padding,groups', CASES)
def test_shifted_matmul_equals_xla_conv(side, kernel, stride, padding, groups):
  x, w, groups = _operands(side, kernel, groups)
  strides, pads = (stride, stride), _padding(padding)

  def reference(x, w):
    return lax.conv_general_dilated(
      x, w, strides, pads, dimension_numbers=_DN, feature_group_count=groups
    )

  def shifted(x, w):
    return conv.shifted_matmul_conv(x, w, strides, pads, groups)

  np.testing.assert_allclose(shifted(x, w), reference(x, w), rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(
    np.random.default_rng(1).standard_normal(reference(x, w).shape), jnp.float32
  )
  grads = [
    jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * cotangent), (0, 1))(x, w)
    for f in (reference, shifted)
  ]
  for got, want in zip(grads[1], grads[0]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  'side,kernel,stride,padding,groups', [(2, 3, 1, 1, 1), (3, 3, 2, 1, 1), (3, 7, 1, 3, 'depthwise')]
)
def test_shifted_matmul_gradients_by_finite_differences(side, kernel, stride, padding, groups):
  x, w, groups = _operands(side, kernel, groups, channels=3, out=2, batch=2)
  with jax.enable_x64(True):
    x, w = jnp.asarray(np.asarray(x), jnp.float64), jnp.asarray(np.asarray(w), jnp.float64)
    check_grads(
      lambda x, w: conv.shifted_matmul_conv(x, w, (stride, stride), _padding(padding), groups),
      (x, w),
      order=2,
      modes=('rev',),
      atol=1e-6,
      rtol=1e-6,
    )


def test_skipped_taps_only_read_padding():
  # 3x3 on a 1x1 map with padding 1: only the centre tap reads the pixel, so the
  # convolution is the dense layer of the centre weights.
  x, w, _ = _operands(1, 3, 1)
  got = conv.shifted_matmul_conv(x, w, (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_allclose(got[:, 0, 0], x[:, 0, 0] @ w[1, 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('channels,want', [(4, 'xla'), (128, 'xla'), (256, 'chunked_grad')])
@pytest.mark.parametrize('side,stride', [(4, 1), (7, 2)])
def test_auto_lowering_keeps_xla_on_4x4_maps_with_few_channels(channels, want, side, stride):
  """The ImageNet stem's 4x4x128 layers (chunked GEMMs too small) against the small stem's
  4x4x512 ones."""
  x, w, _ = _operands(side, 3, 1, channels=channels, out=8, batch=1)
  got = conv.choose_lowering('auto', 'cpu', x.shape, w.shape, (stride, stride), _padding(1))
  assert got == want


@pytest.mark.parametrize(
  'backend,side,kernel,stride,groups,want',
  [
    ('cpu', 2, 3, 1, 1, 'shifted_matmul'),  # tiny map
    ('cpu', 4, 3, 2, 1, 'shifted_matmul'),  # 2x2 output
    ('cpu', 28, 3, 1, 1, 'chunked_grad'),  # large map
    ('cpu', 4, 3, 1, 1, 'xla'),  # 4x4 output, few channels: GEMMs too small
    ('cpu', 5, 3, 1, 1, 'chunked_grad'),  # 5x5 output
    ('cpu', 28, 3, 2, 1, 'chunked_grad'),
    ('cpu', 28, 7, 1, 'depthwise', 'shifted_matmul'),
    ('cpu', 28, 2, 2, 1, 'shifted_matmul'),  # non-overlapping windows
    ('cpu', 28, 1, 2, 1, 'shifted_matmul'),
    ('cpu', 4, 3, 1, 2, 'xla'),  # grouped, not depthwise
    ('gpu', 2, 3, 1, 1, 'xla'),
    ('tpu', 28, 7, 1, 'depthwise', 'xla'),
  ],
)
def test_auto_lowering_rule(backend, side, kernel, stride, groups, want):
  x, w, groups = _operands(side, kernel, groups, channels=4, out=4)
  padding = 'VALID' if kernel <= stride else kernel // 2
  assert (
    conv.choose_lowering(
      'auto', backend, x.shape, w.shape, (stride, stride), _padding(padding), groups
    )
    == want
  )
  before = 'xla' if want == 'chunked_grad' else want
  assert (
    conv.choose_lowering(
      'auto_xla_grad', backend, x.shape, w.shape, (stride, stride), _padding(padding), groups
    )
    == before
  )
  for forced in ('xla', 'shifted_matmul', 'chunked_grad'):
    assert (
      conv.choose_lowering(
        forced, backend, x.shape, w.shape, (stride, stride), _padding(padding), groups
      )
      == forced
    )


def test_lowering_errors():
  with pytest.raises(
    ValueError,
    match='conv_lowering=.im2col.; valid: auto, xla, shifted_matmul, chunked_grad, auto_xla_grad',
  ):
    conv.conv_general_dilated('im2col')
  with pytest.raises(ValueError, match='conv_lowering'):
    get_model('simple_cnn', 10, conv_lowering='fast')
  x, w, _ = _operands(4, 3, 2, channels=4, out=4)
  with pytest.raises(ValueError, match='feature_group_count 1 or depthwise'):
    conv.shifted_matmul_conv(x, w, (1, 1), 'SAME', 2)
  config = base.get_base_config()
  config.model.conv_lowering = 'matmul'
  with pytest.raises(ConfigError, match="config.model.conv_lowering='matmul'"):
    validate_config(config)


def test_forced_lowering_applies_to_flax_conv():
  x, w, _ = _operands(5, 3, 1)
  layer = conv.conv_module('shifted_matmul')(5, (3, 3), padding=1, use_bias=False)
  variables = {'params': {'kernel': w}}
  want = nn.Conv(5, (3, 3), padding=1, use_bias=False).apply(variables, x)
  np.testing.assert_allclose(layer.apply(variables, x), want, rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda x: layer.apply(variables, x))(x))
  assert 'conv_general_dilated' not in jaxpr and 'dot_general' in jaxpr


MODELS = [
  ('simple_cnn', {}, 28),
  ('resnet18', {'width': 4}, 16),
  ('resnet18', {'width': 4, 'stem': 'imagenet'}, 16),
  ('convnext_v2_tiny', {'drop_path_rate': 0.0}, 8),
]


@pytest.mark.parametrize('name,options,side', MODELS)
def test_model_same_under_either_lowering(name, options, side):
  """Same variables, same logits and parameter gradients whatever the lowering.

  In float64: the two lowerings sum in different orders, and in float32 a ReLU input (or a
  max-pool tie) within rounding of 0 can switch a unit's gradient on in one and off in the
  other (tests/numerics.py); the per-convolution tests above are float32.
  """
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, side, side, 1)), jnp.float64)
    labels = jnp.array([1, 3])
    variables = init_variables(get_model(name, 10, **options), jax.random.key(0), side)
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
    results = {}
    # "auto" takes chunked_grad for the 3x3 convolutions from 4x4 up (ConvNeXt's only one is
    # its stem's, left out to save the compilation: the same code as ResNet18's).
    lowerings = ('xla', 'shifted_matmul') + (('auto',) if name != 'convnext_v2_tiny' else ())
    for lowering in lowerings:
      model = get_model(name, 10, conv_lowering=lowering, dtype=jnp.float64, **options)

      def loss(params, model=model):
        logits, _ = model.apply(variables | {'params': params}, x, train=False)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(2), labels]), logits

      (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
      results[lowering] = jax.device_get((logits, grads))
  assert results['xla'][0].dtype == np.float64
  numerics.assert_trees_close(results['shifted_matmul'], results['xla'], rtol=1e-10)
  if 'auto' in results:
    numerics.assert_trees_close(results['auto'], results['xla'], rtol=1e-10)


@pytest.mark.parametrize('name,options,side', MODELS[2:])
def test_auto_lowering_on_this_backend(name, options, side):
  """'auto' is XLA's convolution everywhere but on CPU. Traced on the default backend, a
  model's forward pass holds as many XLA convolutions under 'auto' as under 'xla' on a GPU
  or TPU, and on CPU fewer: there the shifted-matmul form takes ConvNeXt's depthwise 7x7,
  the ResNet's strided 1x1 shortcuts and its 3x3s on maps of 3x3 and less
  (bench/gpu/run.sh runs this on a GPU)."""
  model = get_model(name, 10, **options)
  variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), side))
  x = jnp.zeros((2, side, side, 1))

  def xla_convolutions(lowering):
    model = get_model(name, 10, conv_lowering=lowering, **options)
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
    return str(jaxpr).count('conv_general_dilated[')

  xla, auto = xla_convolutions('xla'), xla_convolutions('auto')
  assert xla > 0
  if jax.default_backend() == 'cpu':
    assert auto < xla
  else:
    assert auto == xla


@pytest.mark.parametrize(
  'side,window,stride,pad', [(28, 2, 2, 0), (7, 2, 2, 0), (5, 3, 2, 1), (14, 3, 2, 1), (2, 3, 2, 1)]
)
def test_max_pool_equals_flax(side, window, stride, pad):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, side, side, 3)), jnp.float32)
  padding = ((pad, pad), (pad, pad))

  def reference(x):
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)

  def ours(x):
    return max_pool(x, (window, window), (stride, stride), padding)

  np.testing.assert_array_equal(ours(x), reference(x))
  # Continuous random inputs have no ties, so the gradients agree exactly.
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(reference(x).shape))
  grads = [jax.grad(lambda x, f=f: jnp.sum(f(x) * cotangent))(x) for f in (reference, ours)]
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6)


def test_max_pool_errors_on_too_small_map():
  with pytest.raises(ValueError, match='window'):
    max_pool(jnp.zeros((1, 1, 1, 1)), (2, 2), (2, 2))


def test_depthwise_gradients_with_the_batch_sharded_over_devices():
  """The kernel gradient's loop over batch chunks gives the same result when the batch is
  split over the 8 devices of a data-parallel mesh (as in a train step)."""
  mesh = parallel.make_mesh()
  x, w, groups = _operands(5, 7, 'depthwise', channels=4, batch=16)
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)

  def grads(x, w, f):
    return jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1))(x, w)

  def shifted(x, w):
    return conv.shifted_matmul_conv(x, w, (1, 1), ((3, 3), (3, 3)), groups)

  def reference(x, w):
    return lax.conv_general_dilated(
      x, w, (1, 1), ((3, 3), (3, 3)), dimension_numbers=_DN, feature_group_count=groups
    )

  sharded_x = jax.device_put(x, parallel.batch_sharded(mesh))
  got = jax.jit(lambda x, w: grads(x, w, shifted))(sharded_x, w)
  want = grads(x, w, reference)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


# The one-group cases of CASES: what "auto" may lower as chunked_grad.
DENSE_CASES = [case for case in CASES if case[-1] == 1]


def _chunked(stride, padding):
  strides = (stride, stride)
  return lambda x, w: conv.conv_general_dilated('chunked_grad')(
    x, w, strides, _padding(padding), dimension_numbers=_DN
  )


def _xla(stride, padding):
  strides = (stride, stride)
  return lambda x, w: lax.conv_general_dilated(
    x, w, strides, _padding(padding), dimension_numbers=_DN
  )


def _value_and_grads(f, x, w, cotangent):
  return f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1))(x, w)


@pytest.mark.parametrize('side,kernel,stride,padding,groups', DENSE_CASES)
def test_chunked_grad_equals_xla_conv(side, kernel, stride, padding, groups, monkeypatch):
  """Values and both gradients, with the batch of 4 in chunks of 1 (4 loop steps)."""
  monkeypatch.setattr(conv, 'GEMM_GRAD_CHUNK_BYTES', 1)
  x, w, _ = _operands(side, kernel, groups, batch=4)
  reference = _xla(stride, padding)
  cotangent = jnp.asarray(
    np.random.default_rng(1).standard_normal(reference(x, w).shape), jnp.float32
  )
  got = _value_and_grads(_chunked(stride, padding), x, w, cotangent)
  want = _value_and_grads(reference, x, w, cotangent)
  numerics.assert_trees_close(got, want, rtol=1e-4)


@pytest.mark.parametrize('chunk', [1, 2, 3, 6])
def test_chunked_kernel_grad_any_chunk(chunk):
  x, w, _ = _operands(5, 3, 1, batch=6)
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((6, 3, 3, 5)), jnp.float32)
  pads = ((1, 1), (1, 1))
  got = conv._chunked_kernel_grad(x, cotangent, w.shape, (2, 2), pads, chunk)
  want = jax.vjp(lambda w: _xla(2, 1)(x, w), w)[1](cotangent)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gemm_grad_chunk():
  # 28x28x64 3x3: 451,584 numbers a sample, 4 samples in 8 MiB; the largest divisor.
  assert conv.gemm_grad_chunk(128, 28 * 28 * 9 * 64) == 4
  assert conv.gemm_grad_chunk(128, 14 * 14 * 9 * 128) == 8
  assert conv.gemm_grad_chunk(128, 4 * 4 * 9 * 512) == 16
  assert conv.gemm_grad_chunk(6, 28 * 28 * 9 * 64) == 3
  assert conv.gemm_grad_chunk(7, 10**9) == 1


@pytest.mark.parametrize('side,kernel,stride,padding', [(4, 3, 1, 1), (3, 3, 2, 1)])
def test_chunked_grad_gradients_by_finite_differences(side, kernel, stride, padding, monkeypatch):
  """Orders 1 and 2 (the Batch-CAM loss differentiates through Grad-CAM's gradient)."""
  monkeypatch.setattr(conv, 'GEMM_GRAD_CHUNK_BYTES', 1)
  x, w, _ = _operands(side, kernel, 1, channels=3, out=2, batch=2)
  with jax.enable_x64(True):
    x, w = jnp.asarray(np.asarray(x), jnp.float64), jnp.asarray(np.asarray(w), jnp.float64)
    check_grads(_chunked(stride, padding), (x, w), order=2, modes=('rev',), atol=1e-6, rtol=1e-6)


def _second_order(f, x, w, cotangent):
  """Gradient in (x, w) of the squared input gradient, as Batch-CAM's loss takes it."""

  def input_grad_norm(x, w):
    dx = jax.grad(lambda x: jnp.sum(f(x, w) * cotangent))(x)
    return jnp.sum(dx**2)

  return jax.grad(input_grad_norm, (0, 1))(x, w)


@pytest.mark.parametrize('sharded', [False, True])
@pytest.mark.parametrize('chunk_bytes', [1, 8 * 4 * 4 * 9 * 4 * 4])  # chunks of 1; of 8
def test_chunked_grad_with_the_batch_sharded_over_devices(sharded, chunk_bytes, monkeypatch):
  """First and second-order gradients equal XLA's with the batch of 16 on 1 device or split
  over the 8 devices of a data-parallel mesh (as in a train step), in chunks that do and do
  not divide the per-device batch."""
  monkeypatch.setattr(conv, 'GEMM_GRAD_CHUNK_BYTES', chunk_bytes)
  x, w, _ = _operands(8, 3, 1, channels=4, out=3, batch=16)
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((16, 4, 4, 3)), jnp.float32)
  if sharded:
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    x = jax.device_put(x, parallel.batch_sharded(mesh))
    cotangent = jax.device_put(cotangent, parallel.batch_sharded(mesh))

  def both(f, x, w, cotangent):
    return _value_and_grads(f, x, w, cotangent), _second_order(f, x, w, cotangent)

  got = jax.jit(lambda *a: both(_chunked(2, 1), *a))(x, w, cotangent)
  want = both(_xla(2, 1), x, w, cotangent)
  numerics.assert_trees_close(got, want, rtol=1e-4)
