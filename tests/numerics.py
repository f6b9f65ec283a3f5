"""Comparisons of float results computed in different orders (meshes, processes, lowerings).

Two computations of the same sum in a different order differ by rounding errors that scale
with the size of the terms, not of the result: an element that is a small difference of
large terms (a gradient entry, a centred activation) can differ by 100% of itself while the
computation is exact to float precision. So every leaf is compared with an absolute
tolerance of `rtol` times the leaf's largest magnitude (a normwise relative error), never
element by element. Pick `rtol` from a measured rounding level (the float64 reference or a
perturbation run of `bench/mesh_drift.py`) with a margin, and far below the error of the bug
the test exists to catch.
"""

import jax
import numpy as np


def assert_trees_close(actual, desired, rtol: float, what: str = '') -> None:
  """Each leaf of `actual` within `rtol * max|leaf of desired|` of `desired`, elementwise.

  Trees must have the same structure; an all-zero leaf of `desired` must be matched exactly.
  """
  actual, desired = jax.device_get(actual), jax.device_get(desired)
  paths = jax.tree_util.tree_flatten_with_path(desired)[0]
  flat_actual = jax.tree.leaves(actual)
  assert len(flat_actual) == len(paths), f'{what}: {len(flat_actual)} leaves against {len(paths)}'
  for (path, want), got in zip(paths, flat_actual):
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    where = f'{what}{jax.tree_util.keystr(path)}'
    assert got.shape == want.shape, f'{where}: shape {got.shape} != {want.shape}'
    scale = float(np.max(np.abs(want), initial=0.0))
    np.testing.assert_allclose(
      got, want, rtol=0, atol=rtol * scale, err_msg=f'{where} (scale {scale:.3g})'
    )


def relative_difference(actual, desired) -> float:
  """The largest over leaves of max|actual - desired| / max|desired|: the figure that
  `assert_trees_close` bounds by `rtol`."""
  worst = 0.0
  for got, want in zip(
    jax.tree.leaves(jax.device_get(actual)), jax.tree.leaves(jax.device_get(desired))
  ):
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    scale = float(np.max(np.abs(want), initial=0.0))
    diff = float(np.max(np.abs(got - want), initial=0.0))
    worst = max(worst, diff / scale if scale else (np.inf if diff else 0.0))
  return worst
