"""`bcam_jax.cam_loss`: the Prototype Loss and the Batch-CAM Prototype Loss of any model.

Against a naive per-image reference on a linen model written here (its layer's features and
the rest of the network as two methods, each image alone, G by `jax.grad`); equal to the zoo's
fast path and to the interception path on our own model; second order checked by finite
differences; BatchNorm statistics and dropout RNGs pass through; jit on a batch sharded over
8 devices gives the global batch's value; an NNX model with BatchNorm and dropout trains in
train mode through it, its CAM term falling.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from bcam_jax import cam, explain, losses, models, objective, parallel

CLASSES, SIDE, PROTO = 3, 12, 10


class UserCNN(nn.Module):
  """A user's network: conv -> conv (the explained layer 'conv2') -> BatchNorm -> dropout ->
  pool -> dense, with `features` and `rest` exposing the two halves to the reference."""

  def setup(self):
    self.conv1 = nn.Conv(4, (3, 3))
    self.conv2 = nn.Conv(5, (3, 3), strides=2)
    self.bn = nn.BatchNorm(momentum=0.5)
    self.dropout = nn.Dropout(0.25)
    self.dense = nn.Dense(CLASSES)

  def features(self, x):
    return self.conv2(nn.gelu(self.conv1(x)))

  def rest(self, a, train: bool = False):
    y = nn.gelu(self.bn(a, use_running_average=not train))
    y = self.dropout(y, deterministic=not train)
    return self.dense(y.mean((1, 2)))

  def __call__(self, x, train: bool = False):
    return self.rest(self.features(x), train)


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, SIDE, SIDE, 2)), jnp.float32)
  labels = jnp.asarray(np.arange(n) % CLASSES if n >= CLASSES else rng.integers(0, CLASSES, n))
  return x, labels.astype(jnp.int32)


@pytest.fixture(scope='module')
def user():
  model = UserCNN()
  x, _ = _batch()
  variables = model.init(jax.random.key(0), x, train=False)
  # Random BatchNorm statistics, so evaluation mode is not the identity.
  rng = np.random.default_rng(5)
  stats = jax.tree.map(
    lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), variables['batch_stats']
  )
  return model, {'params': variables['params'], 'batch_stats': stats}


def _prototypes(seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(CLASSES, PROTO, PROTO)), jnp.float32)


def _reference(model, variables, x, labels, prototypes, kind, metric='l1'):
  """Each image alone: A_i from `features`, G_i = d S_{y_i} / d A_i by jax.grad of `rest`;
  Grad-CAM weighting and the class means by hand, in float64."""
  feats, grads = [], []
  for i in range(x.shape[0]):
    a = model.apply(variables, x[i : i + 1], method='features')[0]
    score = lambda a, i=i: model.apply(variables, a[None], method='rest')[0, labels[i]]
    feats.append(np.asarray(a, np.float64))
    grads.append(np.asarray(jax.grad(score)(a), np.float64))
  feats, grads, labels = np.stack(feats), np.stack(grads), np.asarray(labels)

  def grad_cam(a, g):  # (h, w, K), (h, w, K) -> (h, w)
    return np.maximum((a * g.mean((0, 1))).sum(-1), 0)

  def compare(m, p):
    m = cam.normalize_cam(cam.upsample_cam(jnp.asarray(m, jnp.float32), PROTO))
    return float(objective.map_distance(m, p, metric))

  if kind == 'proto':
    return np.mean(
      [compare(grad_cam(feats[i], grads[i]), prototypes[labels[i]]) for i in range(len(labels))]
    )
  total = 0.0
  for c in range(CLASSES):
    members = labels == c
    if members.any():
      total += compare(grad_cam(feats[members].mean(0), grads[members].mean(0)), prototypes[c])
  return total


@pytest.mark.parametrize('kind', losses.KINDS)
def test_a_user_model_matches_the_per_image_reference(user, kind):
  model, variables = user
  x, labels = _batch()
  prototypes = _prototypes()
  out = jax.jit(
    lambda v: losses.cam_loss(model, v, x, labels, prototypes, kind=kind, layer='conv2')
  )(variables)
  want = _reference(model, variables, x, labels, prototypes, kind)
  np.testing.assert_allclose(float(out.term), want, rtol=1e-5)
  np.testing.assert_allclose(out.logits, model.apply(variables, x), rtol=1e-6, atol=1e-6)
  assert out.updates == {}


def test_second_order_through_g_matches_finite_differences(user):
  """The gradient of the BCPL term with respect to the parameters (through A and through
  G = dS/dA) against central differences, in float64."""
  model, variables = user
  x, labels = _batch(6)
  prototypes = _prototypes()
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x64 = jnp.asarray(x, jnp.float64)

    def term(params):
      out = losses.cam_loss(
        model,
        {**v64, 'params': params},
        x64,
        labels,
        prototypes.astype(jnp.float64),
        kind='bcpl',
        layer='conv2',
        metric='l2',
      )
      return out.term

    jax.test_util.check_grads(
      term, (v64['params'],), order=1, modes=['rev'], eps=1e-6, atol=1e-6, rtol=1e-5
    )


def test_batch_norm_statistics_and_dropout_pass_through(user):
  model, variables = user
  x, labels = _batch()
  key = jax.random.key(7)
  kwargs = {'train': True, 'mutable': ['batch_stats'], 'rngs': {'dropout': key}}
  out = losses.cam_loss(model, variables, x, labels, _prototypes(), layer='conv2', **kwargs)
  logits, updates = model.apply(variables, x, **kwargs)  # the same dropout mask
  np.testing.assert_allclose(out.logits, logits, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, out.updates, updates)
  assert not np.allclose(
    out.updates['batch_stats']['bn']['mean'], variables['batch_stats']['bn']['mean']
  )
  other = losses.cam_loss(
    model,
    variables,
    x,
    labels,
    _prototypes(),
    layer='conv2',
    **{**kwargs, 'rngs': {'dropout': jax.random.key(8)}},
  )
  assert float(other.term) != float(out.term)  # another dropout mask, another explanation


def test_jit_on_a_sharded_batch_gives_the_global_batch(user):
  model, variables = user
  x, labels = _batch(16, seed=3)
  prototypes = _prototypes()
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  batch = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
  xs, ys = jax.device_put(x, batch), jax.device_put(labels, batch)
  fn = jax.jit(lambda v, a, b: losses.cam_loss(model, v, a, b, prototypes, layer='conv2').term)
  np.testing.assert_allclose(fn(variables, xs, ys), fn(variables, x, labels), rtol=1e-5)
  np.testing.assert_allclose(
    fn(variables, xs, ys), _reference(model, variables, x, labels, prototypes, 'bcpl'), rtol=1e-5
  )


def test_our_models_fast_path_equals_the_interception_path():
  """ResNet-18 at its CAM layer: the backbone-and-head fast path (train.py's) against
  intercepting the last block's output, its CAM layer, as any linen model's."""
  model = models.get_model('resnet18', CLASSES, width=4)
  x = jax.random.normal(jax.random.key(1), (6, 16, 16, 1))
  labels = jnp.array([0, 1, 2, 0, 1, 1])
  variables = models.init_variables(model, jax.random.key(2), 16)
  prototypes = _prototypes()
  fast = losses.cam_loss(model, variables, x, labels, prototypes, kind='bcpl')
  generic = losses.cam_loss(
    explain.LinenModel(model),
    variables,
    x,
    labels,
    prototypes,
    kind='bcpl',
    layer='backbone_net/stage4_block2',
  )
  np.testing.assert_allclose(fast.term, generic.term, rtol=1e-5)
  np.testing.assert_allclose(fast.logits, generic.logits, rtol=1e-5, atol=1e-6)
  # And the train step's own CAM term on the same batch (evaluation-mode BatchNorm aside).
  spec = objective.Objective(kind='bcpl', num_classes=CLASSES, prototype_size=PROTO)
  features = model.apply(variables, x, method='backbone')
  _, explanation, _ = objective.logits_and_explanation(model, variables, features, labels, True)
  np.testing.assert_allclose(fast.term, spec.cam_term(explanation, labels, prototypes), rtol=1e-6)


def test_bad_arguments_are_named(user):
  model, variables = user
  x, labels = _batch()
  with pytest.raises(ValueError, match=r"kind='ce'; valid: \('proto', 'bcpl'\)"):
    losses.cam_loss(model, variables, x, labels, _prototypes(), kind='ce', layer='conv2')
  with pytest.raises(ValueError, match=r"layer 'conv9' is not a layer of UserCNN; valid: conv1"):
    losses.cam_loss(model, variables, x, labels, _prototypes(), layer='conv9')
  with pytest.raises(ValueError, match=r'name the layer of UserCNN'):
    losses.cam_loss(model, variables, x, labels, _prototypes())
  with pytest.raises(ValueError, match=r'prototypes of shape \(3, 10\); expected'):
    losses.cam_loss(model, variables, x, labels, _prototypes()[:, 0], layer='conv2')


class NNXNet(nnx.Module):
  """An NNX network with BatchNorm and dropout after the explained layer 'conv2'."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.linear = nnx.Linear(8 * 6 * 6, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    x = self.dropout(nnx.relu(self.bn(x)))
    return self.linear(x.reshape(x.shape[0], -1))


def _squares(n, seed):
  """Images of one bright square whose corner says the class (0, 1, 2: three corners)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, CLASSES, n)
  x = rng.uniform(0, 0.4, (n, SIDE, SIDE, 1)).astype(np.float32)
  for i, c in enumerate(labels):
    top, left = [(0, 0), (0, 6), (6, 0)][c]
    x[i, top : top + 6, left : left + 6] = 1.0
  return jnp.asarray(x), jnp.asarray(labels, jnp.int32)


def test_an_nnx_model_trains_in_train_mode_through_the_loss():
  """`nnx.split(model, nnx.Param, ...)`'s pattern: the gradient over the parameters alone,
  the rest (BatchNorm statistics, dropout's RNG counters) coming back updated; the CAM term
  falls and the accuracy rises in a plain optax loop."""
  x, labels = _squares(96, 0)
  prototypes = jnp.stack(
    [
      jax.image.resize(jnp.mean(x[labels == c, ..., 0], 0), (PROTO, PROTO), 'bilinear')
      for c in range(CLASSES)
    ]
  )
  prototypes = cam.normalize_cam(prototypes)
  model = NNXNet(nnx.Rngs(0, dropout=1))
  model.train()
  adapter, params, rest = explain.NNXModel.split(model, nnx.Param, ...)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  def loss_fn(params, rest, xb, yb):
    out = losses.cam_loss(adapter, (params, rest), xb, yb, prototypes, layer='conv2')
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, yb).mean()
    return ce + out.term, (out.term, out.updates, jnp.mean(jnp.argmax(out.logits, -1) == yb))

  @jax.jit
  def step(params, rest, opt_state, xb, yb):
    (_, (term, rest, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, rest, xb, yb
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, term, accuracy

  start_mean = np.asarray(rest['bn']['mean'].value)
  history = []
  for i in range(40):
    sl = slice((i % 3) * 32, (i % 3) * 32 + 32)
    params, rest, opt_state, term, accuracy = step(params, rest, opt_state, x[sl], labels[sl])
    history.append((float(term), float(accuracy)))
  assert not np.allclose(rest['bn']['mean'].value, start_mean)  # the statistics moved
  first, last = history[0], np.mean(history[-5:], 0)
  assert last[0] < 0.7 * first[0], history
  assert last[1] > first[1] + 0.2, history


def test_a_linen_model_trains_in_its_own_optax_loop():
  """UserCNN in train mode (BatchNorm statistics mutable, a dropout key per step) with
  cross-entropy + BCPL: the CAM term falls and the accuracy rises."""
  x, labels = _squares(96, 1)
  # UserCNN pools globally, so its second channel also tells the class by brightness.
  x = jnp.concatenate([x, x * (0.3 + 0.35 * labels[:, None, None, None])], axis=-1)
  prototypes = cam.normalize_cam(
    jnp.stack(
      [
        jax.image.resize(jnp.mean(x[labels == c, ..., 0], 0), (PROTO, PROTO), 'bilinear')
        for c in range(CLASSES)
      ]
    )
  )
  model = UserCNN()
  variables = model.init(jax.random.key(0), x[:2])
  params, stats = variables['params'], variables['batch_stats']
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  def loss_fn(params, stats, xb, yb, key):
    out = losses.cam_loss(
      model,
      {'params': params, 'batch_stats': stats},
      xb,
      yb,
      prototypes,
      layer='conv2',
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': key},
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, yb).mean()
    return ce + out.term, (
      out.term,
      out.updates['batch_stats'],
      jnp.mean(jnp.argmax(out.logits, -1) == yb),
    )

  @jax.jit
  def step(params, stats, opt_state, xb, yb, key):
    (_, (term, stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, stats, xb, yb, key
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, term, accuracy

  history = []
  for i in range(40):
    sl = slice((i % 3) * 32, (i % 3) * 32 + 32)
    params, stats, opt_state, term, accuracy = step(
      params, stats, opt_state, x[sl], labels[sl], jax.random.key(i)
    )
    history.append((float(term), float(accuracy)))
  first, last = history[0], np.mean(history[-5:], 0)
  assert last[0] < 0.7 * first[0], history
  assert last[1] > first[1] + 0.2, history


# ---------------------------------------------------------------- Equinox

eqx = pytest.importorskip('equinox')


class EqxCNN(eqx.Module):
  """An Equinox network on one channels-first sample: conv -> conv ('conv2') -> pool ->
  linear, with `features` and `rest` for the reference."""

  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  linear: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k1)
    self.conv2 = eqx.nn.Conv2d(4, 5, 3, stride=2, padding=1, key=k2)
    self.linear = eqx.nn.Linear(5 * 6 * 6, CLASSES, key=k3)

  def features(self, x):
    return self.conv2(jax.nn.gelu(self.conv1(x)))

  def rest(self, a):
    return self.linear(jax.nn.gelu(a).reshape(-1))

  def __call__(self, x):
    return self.rest(self.features(x))


def test_an_equinox_model_matches_the_reference_and_trains():
  """Channels-first, one sample per call: the adapter vmaps it and gives A as NHWC; the
  BCPL term equals a per-image reference, then falls in an optax loop as accuracy rises."""
  model = EqxCNN(jax.random.key(0))
  adapter, params = explain.EquinoxModel.split(model)
  x_nhwc, labels = _squares(96, 2)
  x = jnp.moveaxis(x_nhwc, -1, 1)  # (N, 1, 12, 12), as the model takes it
  prototypes = cam.normalize_cam(
    jnp.stack(
      [
        jax.image.resize(jnp.mean(x_nhwc[labels == c, ..., 0], 0), (PROTO, PROTO), 'bilinear')
        for c in range(CLASSES)
      ]
    )
  )
  xb, yb = x[:12], labels[:12]
  out = jax.jit(lambda p: losses.cam_loss(adapter, p, xb, yb, prototypes, layer='conv2'))(params)
  # The reference: A_i = features(x_i) (C, h, w) -> (h, w, C); G_i by jax.grad of rest.
  total = 0.0
  feats = np.stack([np.moveaxis(np.asarray(model.features(xi)), 0, -1) for xi in xb])
  grads = np.stack(
    [
      np.moveaxis(
        np.asarray(jax.grad(lambda a, i=i: model.rest(a)[yb[i]])(model.features(xb[i]))), 0, -1
      )
      for i in range(12)
    ]
  )
  for c in range(CLASSES):
    m = np.asarray(yb) == c
    a, g = feats[m].mean(0), grads[m].mean(0)
    grad_cam = np.maximum((a * g.mean((0, 1))).sum(-1), 0)
    total += float(
      objective.map_distance(
        cam.normalize_cam(cam.upsample_cam(jnp.asarray(grad_cam), PROTO)), prototypes[c], 'l1'
      )
    )
  np.testing.assert_allclose(float(out.term), total, rtol=1e-5)
  np.testing.assert_allclose(out.logits, jax.vmap(model)(xb), rtol=1e-6, atol=1e-6)

  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  def loss_fn(params, xb, yb):
    out = losses.cam_loss(adapter, params, xb, yb, prototypes, layer='conv2')
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, yb).mean()
    return ce + out.term, (out.term, jnp.mean(jnp.argmax(out.logits, -1) == yb))

  @jax.jit
  def step(params, opt_state, xb, yb):
    (_, (term, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, xb, yb)
    updates, opt_state = tx.update(grads, opt_state, params)
    return eqx.apply_updates(params, updates), opt_state, term, accuracy

  history = []
  for i in range(40):
    sl = slice((i % 3) * 32, (i % 3) * 32 + 32)
    params, opt_state, term, accuracy = step(params, opt_state, x[sl], labels[sl])
    history.append((float(term), float(accuracy)))
  first, last = history[0], np.mean(history[-5:], 0)
  assert last[0] < 0.7 * first[0], history
  assert last[1] > first[1] + 0.2, history


def test_modules_are_not_mistaken_for_adapters():
  """An Equinox or NNX module with a `features` attribute is told to be split; an object
  with a `features` attribute is no adapter."""
  with pytest.raises(TypeError, match=r'EqxCNN is an Equinox module: split it first'):
    losses.cam_loss(EqxCNN(jax.random.key(0)), None, None, None, _prototypes())
  with pytest.raises(TypeError, match=r'NNXNet is an NNX module: split it first'):
    losses.cam_loss(NNXNet(nnx.Rngs(0)), None, None, None, _prototypes())

  class HasFeatures:
    features = 'a backbone'

  with pytest.raises(TypeError, match='cannot explain a HasFeatures'):
    losses.cam_loss(HasFeatures(), None, None, None, _prototypes())


def test_the_explainer_explains_an_equinox_module():
  model = EqxCNN(jax.random.key(3))
  pixels = jax.random.uniform(jax.random.key(4), (4, 1, SIDE, SIDE))
  labels = jnp.array([0, 1, 2, 0])
  explainer = explain.Explainer(model, layer='conv2', image_size=SIDE)
  maps = explainer.maps('grad_cam', explainer.default_variables, pixels, labels)
  assert maps.shape == (4, SIDE, SIDE)
  for i in range(4):  # Grad-CAM of image i by hand, upsampled and scaled as the explainer does
    a = model.features(pixels[i])
    g = jax.grad(lambda a, i=i: model.rest(a)[labels[i]])(a)
    m = jax.nn.relu(jnp.einsum('khw,k->hw', a, g.mean((1, 2))))
    np.testing.assert_allclose(maps[i], cam.normalize_cam(cam.upsample_cam(m, SIDE)), atol=1e-5)


# ---------------------------------------------------------------- outside models, first contact


class Block(nn.Module):
  """A block returning `(hidden, attention)`, as transformer blocks do."""

  @nn.compact
  def __call__(self, x):
    hidden = nn.Conv(5, (3, 3), strides=2)(x)
    return hidden, jax.nn.softmax(hidden, axis=-1)


class TupleLayerNet(nn.Module):
  """Returns an output object; its explained layer 'block' returns a tuple."""

  output_kind: str = 'object'

  @nn.compact
  def __call__(self, x):
    hidden, attention = Block(name='block')(nn.gelu(nn.Conv(4, (3, 3), name='conv1')(x)))
    logits = nn.Dense(CLASSES, name='dense')(nn.gelu(hidden * (1 + attention)).mean((1, 2)))
    if self.output_kind == 'object':
      return Output(logits=logits, hidden=hidden)
    if self.output_kind == 'dict':
      return {'logits': logits}
    return Output(logits=None, hidden=hidden)  # nothing to find the logits by


class Output:
  def __init__(self, logits, hidden):
    self.logits, self.hidden = logits, hidden


def test_output_objects_and_tuple_layers():
  """Logits from an output object or a dict; a layer returning (hidden, attention) is
  explained at its first array (the same term as a perturbation of `hidden` alone)."""
  x, labels = _batch()
  net = TupleLayerNet()
  variables = net.init(jax.random.key(0), x)
  out = losses.cam_loss(net, variables, x, labels, _prototypes(), layer='block')
  np.testing.assert_allclose(out.logits, net.apply(variables, x).logits, rtol=1e-6)
  a, grads = _tuple_reference(net, variables, x, labels)
  _, got_a, got_g, _ = losses.layer_gradients(net, variables, x, labels, layer='block')
  np.testing.assert_allclose(got_a, a, rtol=1e-6)
  np.testing.assert_allclose(got_g, grads, rtol=1e-5, atol=1e-7)
  assert 'block' in explain.LinenModel(net).layers(variables, x)
  as_dict = TupleLayerNet('dict')
  np.testing.assert_allclose(
    losses.cam_loss(as_dict, variables, x, labels, _prototypes(), layer='block').term, out.term
  )
  with pytest.raises(
    TypeError, match=r'the model returned a Output, not logits: give the adapter output='
  ):
    losses.cam_loss(TupleLayerNet('none'), variables, x, labels, _prototypes(), layer='block')


def _tuple_reference(net, variables, x, labels):
  """A = the block's hidden output; G by differentiating the logits with respect to an
  offset added to `hidden` (inside the block's caller) by a separate interception."""
  captured = []

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == 'block' and context.method_name == '__call__':
      captured.append(out[0])
    return out

  with nn.intercept_methods(capture):
    net.apply(variables, x)
  a = captured[0]

  def scores(offset):
    def add(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.module.name == 'block' and context.method_name == '__call__':
        return (out[0] + offset, out[1])
      return out

    with nn.intercept_methods(add):
      logits = net.apply(variables, x).logits
    return jnp.sum(logits[jnp.arange(x.shape[0]), labels])

  return a, jax.grad(scores)(jnp.zeros_like(a))


def test_an_unknown_layer_of_a_deep_model_names_the_nearest():
  model = models.get_model('resnet18', CLASSES, width=4)
  x = jnp.zeros((2, 16, 16, 1))
  variables = models.init_variables(model, jax.random.key(0), 16)
  with pytest.raises(
    ValueError,
    match=r"'backbone_net/stage4_blok2' is not a layer of .*; nearest: "
    r'backbone_net/stage4_block2 \(2, 2, 2, 32\), .*'
    r'\(and \d+ more: Explainer.layer_shapes lists them all\)',
  ) as error:
    losses.cam_loss(
      explain.LinenModel(model),
      variables,
      x,
      jnp.array([0, 1]),
      _prototypes(),
      layer='backbone_net/stage4_blok2',
    )
  assert str(error.value).count('(') <= 7  # five names, not all 40


def test_a_whole_split_result_passes_as_the_variables():
  """`jax.jit(explainer.maps)` and `cam_loss` take `NNXModel.split(model)` (or
  `EquinoxModel.split`) whole, as they take its state alone."""
  net = NNXNet(nnx.Rngs(0))
  net.eval()
  split = explain.NNXModel.split(net)
  explainer = explain.Explainer(split[0], layer='conv2')
  x, labels = _squares(4, 3)
  maps = jax.jit(explainer.maps, static_argnums=0)
  np.testing.assert_allclose(
    maps('grad_cam', split, x, labels), maps('grad_cam', split[1], x, labels), atol=1e-6
  )
  eqx_split = explain.EquinoxModel.split(EqxCNN(jax.random.key(0)))
  loss = jax.jit(
    lambda v: (
      losses.cam_loss(
        eqx_split[0], v, jnp.moveaxis(x, -1, 1), labels, _prototypes(), layer='conv2'
      ).term
    )
  )
  np.testing.assert_allclose(loss(eqx_split), loss(eqx_split[1]), rtol=1e-6)
