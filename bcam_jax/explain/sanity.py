"""Model-parameter randomisation test of saliency maps (Adebayo et al. 2018, "Sanity Checks
for Saliency Maps"), batched under jit.

A method whose maps barely change when the model's learned parameters are replaced by random
ones does not explain the model. Layers are randomised from the output towards the input,
cumulatively (cascading) or one at a time (independent), and each stage's maps are compared
with the trained model's by Spearman rank correlation, per image: near 1 means the maps
ignored what was randomised.
"""

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bcam_jax.cam import at_least_float32

MapsFn = Callable[[object], jax.Array]
MODES = ('cascading', 'independent')


def _average_ranks(x: jax.Array) -> jax.Array:
  """0-based ranks of a 1-D array, tied values sharing the mean of their ranks."""
  ordered = jnp.sort(x)
  below = jnp.searchsorted(ordered, x, side='left')
  up_to = jnp.searchsorted(ordered, x, side='right')
  return (below + up_to - 1).astype(jnp.float32) / 2


def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
  """Spearman rank correlation `(N,)` of each row of `a` and `b` `(N, ...)`, flattened.

  Ties take average ranks (scipy's `spearmanr`), which matters for maps after a ReLU, mostly
  zeros. A row where `a` or `b` is constant has no ranking to correlate: it gives 0 (scipy
  gives NaN), so the value stays summable over a batch and reads as "no agreement".
  """
  n = a.shape[0]
  ranks_a = jax.vmap(_average_ranks)(at_least_float32(a).reshape(n, -1))
  ranks_b = jax.vmap(_average_ranks)(at_least_float32(b).reshape(n, -1))
  ranks_a = ranks_a - jnp.mean(ranks_a, axis=-1, keepdims=True)
  ranks_b = ranks_b - jnp.mean(ranks_b, axis=-1, keepdims=True)
  norms = jnp.sqrt(jnp.sum(ranks_a**2, axis=-1) * jnp.sum(ranks_b**2, axis=-1))
  ok = norms > 0
  return jnp.where(ok, jnp.sum(ranks_a * ranks_b, axis=-1) / jnp.where(ok, norms, 1.0), 0.0)


def _path_names(path) -> tuple[str, ...]:
  """A `tree_flatten_with_path` key path as strings ('params', 'Dense_0', 'kernel')."""
  names = []
  for entry in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(entry, attribute):
        names.append(str(getattr(entry, attribute)))
        break
  return tuple(names)


def default_layers(params) -> list[tuple[str, ...]]:
  """The entries of a Flax variables dict's 'params' collection (of `params` itself when it
  has none), from the last to the first. Other collections (batch statistics) are not learned
  weights and stay as they are.

  `Module.init` keeps submodules in call order, so straight from it this runs from the output
  towards the input. Any tree that went through `jit` or `jax.tree.map` (a train state, a
  restored checkpoint) has its keys sorted instead, and this order is then reverse
  alphabetical, rarely the network's: pass `layers` explicitly for a real model.
  """
  tree = params['params'] if isinstance(params, Mapping) and 'params' in params else params
  prefix = ('params',) if tree is not params else ()
  return [prefix + (str(name),) for name in reversed(list(tree))]


def _as_prefix(layer: str | Sequence[str]) -> tuple[str, ...]:
  return tuple(layer.split('/')) if isinstance(layer, str) else tuple(str(k) for k in layer)


def _check_prefix(prefix: tuple[str, ...], paths: list[tuple[str, ...]]) -> None:
  """A ValueError naming the valid entries at the first level where `prefix` leaves params."""
  for depth in range(len(prefix)):
    valid = sorted({p[depth] for p in paths if p[:depth] == prefix[:depth] and len(p) > depth})
    if prefix[depth] not in valid:
      where = '/'.join(prefix[:depth]) or 'the top level of params'
      raise ValueError(
        f'layer {"/".join(prefix)!r} is not in params: {where} has {", ".join(valid) or "nothing"}'
      )


def stage_table(params, layers=None, mode: str = 'cascading') -> tuple[list[str], np.ndarray]:
  """Layer names ('/'-joined) and which leaves (in `jax.tree.leaves` order) each stage
  randomises `(S, L)`: stage s takes layers[: s + 1] (cascading) or layers[s] (independent).
  Layers are parameter-path prefixes, tuples of keys or '/'-joined strings."""
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, not {mode!r}')
  paths = [_path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  prefixes = [_as_prefix(layer) for layer in (default_layers(params) if layers is None else layers)]
  if not prefixes:
    raise ValueError('no layers to randomise')
  for prefix in prefixes:
    _check_prefix(prefix, paths)
  chosen = np.array([[p[: len(prefix)] == prefix for p in paths] for prefix in prefixes])
  table = np.logical_or.accumulate(chosen, axis=0) if mode == 'cascading' else chosen
  return ['/'.join(prefix) for prefix in prefixes], table


@jax.jit
def random_like(params, key: jax.Array):
  """A re-initialisation of every floating leaf: normal with the leaf's own mean and standard
  deviation, leaf i (in `jax.tree.leaves` order) drawn with `jax.random.split(key, L)[i]`.

  The paper re-draws a layer from its initialiser, which an arbitrary model does not expose;
  matching the leaf's first two moments keeps the layer's scale (activations neither vanish
  nor explode) and destroys what training arranged. A constant leaf (a zero bias, a unit norm
  scale) stays as it is: it is what its initialiser would give. Other leaves stay too.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))

  def draw(leaf, leaf_key):
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      return leaf
    wide = at_least_float32(leaf)
    noise = jax.random.normal(leaf_key, wide.shape, wide.dtype)
    return (jnp.mean(wide) + jnp.std(wide) * noise).astype(leaf.dtype)

  return jax.tree.unflatten(treedef, [draw(leaf, k) for leaf, k in zip(leaves, keys)])


@partial(jax.jit, static_argnums=0)
def _stage_correlations(maps_fn: MapsFn, params, key: jax.Array, table: jax.Array):
  """Per-stage per-image Spearman correlations `(S, N)` of maps and absolute maps; the stages
  go through `maps_fn` one after another in a `lax.map`, each with its params selected
  leaf by leaf between the trained and the random ones."""
  original = maps_fn(params)
  leaves, treedef = jax.tree.flatten(params)
  random_leaves = jax.tree.leaves(random_like(params, key))

  def stage(row):
    chosen = [jnp.where(row[i], r, t) for i, (t, r) in enumerate(zip(leaves, random_leaves))]
    maps = maps_fn(jax.tree.unflatten(treedef, chosen))
    return spearman(original, maps), spearman(jnp.abs(original), jnp.abs(maps))

  return jax.lax.map(stage, table)


def cascading_randomization(
  maps_fn: MapsFn,
  params,
  key: jax.Array,
  layers: Sequence[str | Sequence[str]] | None = None,
  mode: str = 'cascading',
) -> dict[str, object]:
  """Adebayo et al.'s model-parameter randomisation test of `maps_fn(params) -> (N, h, w)`.

  `layers` are parameter-path prefixes from the output towards the input (default
  `default_layers(params)`); stage s re-initialises layers[: s + 1] ('cascading') or only
  layers[s] ('independent') by `random_like(params, key)`, so a leaf gets the same random
  values in every stage that randomises it and independent stage 0 equals cascading stage 0.
  There is no stage of nothing randomised (its correlation would be 1).

  Returns 'layers' (S names, '/'-joined), 'spearman' `(S, N)` of the maps with the trained
  model's, image by image, and 'spearman_abs' of their absolute values (the same for maps
  after a ReLU; the paper's choice for signed maps such as gradients). Call it outside jit
  (the names are strings); it jits the stages itself, with `maps_fn` as a static argument:
  reuse one function object to reuse the compilation.
  """
  names, table = stage_table(params, layers, mode)
  correlations, correlations_abs = _stage_correlations(maps_fn, params, key, jnp.asarray(table))
  return {'layers': names, 'spearman': correlations, 'spearman_abs': correlations_abs}


def block_layers(explainer, variables, pixels) -> list[str]:
  """A library model's parameter blocks from the output towards the input, the `layers` of
  `randomisation_test`: the head (and CA-Stream's stream), then each module directly under
  the backbone in reverse call order (a residual block, a stem layer), as 'params/...'
  paths. `explainer` is the model's `explain.Explainer`."""
  params = variables['params']
  called = [p.split('/')[:2] for p in explainer.layer_shapes(variables, pixels) if '/' in p]
  blocks = [b for b in dict.fromkeys(tuple(p) for p in called) if b[1] in params.get(b[0], {})]
  heads = [k for k in params if k != 'backbone_net']
  return [f'params/{k}' for k in heads] + ['params/' + '/'.join(b) for b in reversed(blocks)]


def randomisation_test(
  explainer, variables, pixels: jax.Array, targets: jax.Array, methods: Sequence[str]
) -> dict[str, object]:
  """The cascading randomisation test of each of `methods` on `pixels` `(N, H, W, C)` with
  `targets` `(N,)`, the model's blocks (`block_layers`) randomised from the output down,
  one stage per block, from a fixed key (a result is reproducible).

  Returns 'images' (N), 'layers' (the S blocks) and 'methods': per method the mean over the
  images of each stage's Spearman correlation with the trained model's maps, S floats.
  """
  layers = block_layers(explainer, variables, pixels)
  result = {'images': int(pixels.shape[0]), 'layers': layers, 'methods': {}}
  for method in methods:
    stages = cascading_randomization(
      partial(explainer.maps, method, pixels=pixels, targets=targets),
      variables,
      jax.random.key(0),
      layers,
    )
    result['methods'][method] = [float(v) for v in np.mean(stages['spearman'], axis=1)]
  return result
