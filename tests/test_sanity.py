"""The model-parameter randomisation test: Spearman against scipy, stages against their meaning
and against a naive loop, on one and on eight devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import stats

from bcam_jax import cam
from bcam_jax.explain import sanity

LAYERS = ['params/dense', 'params/aux', 'params/conv1', 'params/conv0']  # output -> input


@pytest.mark.filterwarnings('ignore::scipy.stats.ConstantInputWarning')
def test_spearman_equals_scipy_with_ties_and_gives_0_for_constant_rows():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 4, (6, 5, 5)).astype(np.float32)  # many ties
  b = np.maximum(rng.normal(size=(6, 5, 5)), 0).astype(np.float32)  # half zeros, as a ReLU map
  b[1] = a[1] ** 2  # a monotone function of a: correlation 1
  a[4] = 2.0  # constant rows
  b[5] = 0.0
  got = np.asarray(jax.jit(sanity.spearman)(a, b))
  want = [stats.spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)]
  np.testing.assert_allclose(got[:4], want[:4], atol=1e-6)
  np.testing.assert_allclose(got[1], 1.0, atol=1e-6)
  np.testing.assert_array_equal(got[4:], 0.0)  # scipy: NaN
  assert np.isnan(want[4:]).all()


class Tiny(nn.Module):
  """Two convolutions (the CAM layer is the second), a linear head on their mean, and an
  auxiliary head the maps never use."""

  def setup(self):
    self.conv0 = nn.Conv(4, (3, 3))
    self.conv1 = nn.Conv(6, (3, 3))
    self.dense = nn.Dense(3)
    self.aux = nn.Dense(2)

  def features(self, x):
    return nn.relu(self.conv1(nn.relu(self.conv0(x))))

  def head(self, a):
    return self.dense(jnp.mean(a, axis=(1, 2)))

  def __call__(self, x):
    a = self.features(x)
    return self.head(a), self.aux(jnp.mean(a, axis=(1, 2)))


@pytest.fixture(scope='module')
def case():
  """The model, images `(8, 8, 8, 2)`, variables (sorted by jit: aux, conv0, conv1, dense),
  targets, Grad-CAM's maps_fn, and its cascading randomisation over LAYERS with key 2."""
  model = Tiny()
  images = jax.random.uniform(jax.random.key(0), (8, 8, 8, 2))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  targets = jnp.arange(8) % 3

  def maps_fn(v, images=images):
    head = lambda a: model.apply(v, a, method='head')
    return cam.grad_cam(head, model.apply(v, images, method='features'), targets)

  cascading = sanity.cascading_randomization(maps_fn, variables, jax.random.key(2), LAYERS)
  return model, images, variables, targets, maps_fn, cascading


def test_default_layers_run_from_the_last_entry_and_unknown_layers_are_named(case):
  variables = case[2]
  assert sanity.default_layers(variables) == [
    ('params', name) for name in reversed(list(variables['params']))
  ]
  unsorted = {'params': {'conv0': {'w': 1.0}, 'dense': {'w': 2.0}}, 'batch_stats': {}}
  assert sanity.default_layers(unsorted) == [('params', 'dense'), ('params', 'conv0')]
  assert sanity.default_layers(unsorted['params']) == [('dense',), ('conv0',)]
  with pytest.raises(ValueError, match="'params/conv9'.*params has aux, conv0, conv1, dense"):
    sanity.stage_table(variables, ['params/dense', 'params/conv9'])
  with pytest.raises(ValueError, match="'stats'.*top level of params has params"):
    sanity.stage_table(variables, [('stats',)])
  with pytest.raises(ValueError, match='mode'):
    sanity.stage_table(variables, LAYERS, 'reverse')
  names, table = sanity.stage_table(variables, [('params', 'dense'), 'params/conv0/kernel'])
  assert names == ['params/dense', 'params/conv0/kernel'] and table.shape == (2, 8)
  np.testing.assert_array_equal(table.sum(1), [2, 3])  # dense's 2 leaves, then + conv0 kernel


def test_random_like_matches_each_leaf_moments_and_keeps_constant_ones():
  tree = {
    'w': jnp.arange(4000.0) / 1000,
    'b': jnp.zeros(3),
    'scale': jnp.ones(2),
    'n': jnp.arange(3),
  }
  got = sanity.random_like(tree, jax.random.key(0))
  assert abs(float(got['w'].mean()) - 1.9995) < 0.05 and abs(float(got['w'].std()) - 1.155) < 0.05
  assert not np.allclose(np.sort(got['w']), tree['w'], atol=0.01)
  for name in ('b', 'scale', 'n'):
    np.testing.assert_array_equal(got[name], tree[name])


def test_randomization_stages_mean_what_they_say(case):
  _, _, variables, _, maps_fn, cascading = case
  independent = sanity.cascading_randomization(
    maps_fn, variables, jax.random.key(2), LAYERS, 'independent'
  )
  c, i = np.asarray(cascading['spearman']), np.asarray(independent['spearman'])
  assert cascading['layers'] == LAYERS and c.shape == i.shape == (4, 8)
  np.testing.assert_array_equal(i[0], c[0])  # the same first stage
  np.testing.assert_array_equal(i[1], 1.0)  # the maps never use aux: identical maps
  np.testing.assert_array_equal(c[1], c[0])  # so adding it to the cascade changes nothing
  assert c[0].mean() < 0.9 and abs(c[3].mean()) < 0.3  # everything random: nothing left
  assert not np.allclose(c[2:], i[2:])  # one layer at a time is not the cascade
  np.testing.assert_allclose(cascading['spearman_abs'], c, atol=1e-6)  # Grad-CAM is >= 0


def test_randomization_equals_a_naive_loop_over_stages(case):
  _, _, variables, _, maps_fn, got = case
  random = sanity.random_like(variables, jax.random.key(2))
  maps_fn = jax.jit(maps_fn)
  original = np.asarray(maps_fn(variables))
  for s in range(len(LAYERS)):
    prefixes = [tuple(layer.split('/')) for layer in LAYERS[: s + 1]]

    def pick(path, trained, drawn, prefixes=prefixes):
      names = tuple(k.key for k in path)
      return drawn if any(names[: len(p)] == p for p in prefixes) else trained

    params = jax.tree_util.tree_map_with_path(pick, variables, random)
    maps = np.asarray(maps_fn(params))
    want = [stats.spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(original, maps)]
    np.testing.assert_allclose(got['spearman'][s], np.nan_to_num(want), atol=1e-5)


def test_randomization_on_one_and_eight_devices_agree(case):
  model, images, variables, targets, _, one_device = case
  assert len(jax.devices()) == 8
  mesh = Mesh(np.array(jax.devices()), ('batch',))
  sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec('batch')))

  def maps_fn(v):
    head = lambda a: model.apply(v, a, method='head')
    return cam.grad_cam(head, model.apply(v, sharded, method='features'), targets)

  eight = sanity.cascading_randomization(maps_fn, variables, jax.random.key(2), LAYERS)
  np.testing.assert_allclose(eight['spearman'], one_device['spearman'], atol=1e-6)
  np.testing.assert_allclose(eight['spearman_abs'], one_device['spearman_abs'], atol=1e-6)
