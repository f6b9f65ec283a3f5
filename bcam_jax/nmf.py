"""Non-negative matrix factorization X ~ W H inside `jit`: scikit-learn's `NMF` with
`init='random'` and its coordinate-descent solver, for one matrix or a batch of them.

Deep Feature Factorization (`bcam_jax.cam.deep_feature_factorization`) factorizes each
image's activations with scikit-learn's `NMF(n_components, init='random', random_state=0)`
in pytorch-grad-cam; this is the same algorithm as a pure JAX function, so a whole batch
factorizes under `jit`, one `lax.while_loop` vmapped over the images, with no scikit-learn
at run time:

- initialization (`_initialize_nmf`, init='random'): H then W drawn from
  `np.random.RandomState(seed).standard_normal`, cast to the data's dtype, scaled by
  sqrt(mean(X) / n_components), absolute values. The draws depend only on the shapes, so
  they are made in numpy while tracing; mean(X) enters as a traced scale.
- iterations (`_fit_coordinate_descent`, no regularization, no shuffle): W then H, each one
  sweep of coordinate descent over the components in order (`_update_cdnmf_fast`), each
  component's column updated for all rows at once (the rows of one column are independent:
  row i's gradient reads only row i of W), W[:, t] <- max(W[:, t] - grad / HHt[t, t], 0).
- stopping: the sum of |projected gradient| of both sweeps (the violation) over that of the
  first iteration at most `tol`, or `max_iter` iterations.

The arithmetic is scikit-learn's in the data's dtype (float32 for float32 activations, as
pytorch-grad-cam passes them); only the order of the sums differs (BLAS against XLA, the
Cython loop's sequential sums against vectorized ones), so the factors agree to float32
rounding amplified by the iterations. The matrix products run at full precision
(`Precision.HIGHEST`) on every backend. Not reverse-differentiable (`lax.while_loop`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


class Factors(NamedTuple):
  """X `(..., S, F)` ~ w @ h: `w` `(..., S, n)`, `h` `(..., n, F)`, and the iterations run
  `(...)` (scikit-learn's `n_iter_`)."""

  w: jax.Array
  h: jax.Array
  n_iter: jax.Array


def random_init(x: jax.Array, n_components: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """scikit-learn's `_initialize_nmf(X, n_components, init='random', random_state=seed)` for
  one matrix `x` `(S, F)`: W `(S, n)` and H `(n, F)`, |N(0, 1)| draws (H's first, then W's,
  from one `RandomState(seed)`, cast to x's dtype) times sqrt(mean(x) / n_components)."""
  samples, features = x.shape
  rng = np.random.RandomState(seed)
  h = rng.standard_normal(size=(n_components, features)).astype(x.dtype)
  w = rng.standard_normal(size=(samples, n_components)).astype(x.dtype)
  scale = jnp.sqrt(jnp.mean(x) / n_components)
  return jnp.abs(scale * w), jnp.abs(scale * h)


def _sweep(x: jax.Array, w: jax.Array, ht: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One coordinate-descent sweep of `w` `(S, n)` for x `(S, F)` ~ w @ ht.T, components in
  order (scikit-learn's `_update_coordinate_descent` + `_update_cdnmf_fast`): the updated w
  and the sweep's violation, sum |projected gradient|."""
  hht = jnp.dot(ht.T, ht, precision=_HIGHEST)
  xht = jnp.dot(x, ht, precision=_HIGHEST)

  def component(t, carry):
    w, violation = carry
    column = w[:, t]
    grad = jnp.dot(w, hht[t], precision=_HIGHEST) - xht[:, t]
    projected = jnp.where(column == 0, jnp.minimum(grad, 0), grad)
    hess = hht[t, t]
    step = jnp.maximum(column - grad / jnp.where(hess != 0, hess, 1), 0)
    w = w.at[:, t].set(jnp.where(hess != 0, step, column))
    return w, violation + jnp.sum(jnp.abs(projected))

  return jax.lax.fori_loop(0, w.shape[1], component, (w, jnp.zeros((), w.dtype)))


def _factorize(x: jax.Array, n_components: int, tol: float, max_iter: int, seed: int) -> Factors:
  w, h = random_init(x, n_components, seed)

  def cond(state):
    n_iter, _, _, _, done = state
    return jnp.logical_and(~done, n_iter < max_iter)

  def body(state):
    n_iter, w, ht, initial, _ = state
    w, violation_w = _sweep(x, w, ht)
    ht, violation_h = _sweep(x.T, ht, w)
    violation = violation_w + violation_h
    n_iter = n_iter + 1
    initial = jnp.where(n_iter == 1, violation, initial)
    done = jnp.logical_or(initial == 0, violation / initial <= tol)
    return n_iter, w, ht, initial, done

  zero = jnp.zeros((), x.dtype)
  state = (jnp.zeros((), jnp.int32), w, h.T, zero, jnp.zeros((), bool))
  n_iter, w, ht, _, _ = jax.lax.while_loop(cond, body, state)
  return Factors(w, ht.T, n_iter)


def nmf(
  x: jax.Array, n_components: int, *, tol: float = 1e-4, max_iter: int = 200, seed: int = 0
) -> Factors:
  """Non-negative factors of `x` `(..., S, F)` >= 0, each matrix of the leading axes on its
  own: scikit-learn's `NMF(n_components, init='random', random_state=seed, tol=tol,
  max_iter=max_iter).fit_transform(x)` (W, `components_` H, `n_iter_`), in x's dtype (at
  least float32). All matrices start from the same random draws, each scaled by its own
  mean; the batch runs until its slowest matrix stops (`lax.while_loop` under `vmap`), each
  matrix's iterations ending where scikit-learn's would."""
  if n_components < 1 or max_iter < 1:
    raise ValueError(f'n_components={n_components}, max_iter={max_iter}; expected >= 1')
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  factorize = lambda m: _factorize(m, n_components, tol, max_iter, seed)
  for _ in range(x.ndim - 2):
    factorize = jax.vmap(factorize)
  return factorize(x)
