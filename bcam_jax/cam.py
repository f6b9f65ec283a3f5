"""Class activation maps computed inside `jit`: CAM, Grad-CAM, Grad-CAM++, XGrad-CAM,
HiResCAM, LayerCAM, element-wise Grad-CAM, ShapleyCAM, Finer-CAM, Eigen-CAM, Eigen-Grad-CAM,
Seg-Eigen-CAM, KPCA-CAM, FEM, Deep Feature Factorization, Ablation-CAM, Score-CAM and
Batch-CAM, each for a whole batch at once, and RefineCAM's fusion of several layers' maps.

The gradient-based methods take `head_fn`, a pure and strictly per-sample function mapping CAM-layer
features `(N, h, w, K)` to logits `(N, C)` (e.g. `lambda a: model.apply(variables, a,
method='head')`). `targets` says what is explained (`Targets`): int class indices `(N,)`, or
a per-sample callable `scores_fn(logits (N, C)) -> (N,)` (row i depending only on logits row
i), e.g. `lambda l: jax.nn.softmax(l)[:, 3]`; `target_scores` gives S_i, the target logit or
the callable's value. Because sample i's logits depend only on sample i's features, one
`jax.vjp` of S with a cotangent of ones (for indices, the one-hot cotangent of the logits)
yields

    G_i = dS_i / dA_i        for every sample i at once (paper eq. 3),

with no hooks and no per-sample loop. All functions are differentiable, including through
G (second order through the head), so they can sit inside a training loss; Deep Feature
Factorization alone is not (its NMF iterates to convergence in a `lax.while_loop`).

Every map function returns non-negative maps `(N, h, w)` at feature resolution, in at least
float32; `upsample_cam` and `normalize_cam` bring them to image size and [0, 1]. A layer
other than the CAM layer is explained through `bcam_jax.explain.layer_features`, which builds
the matching `head_fn`.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcam_jax import nmf

HeadFn = Callable[[jax.Array], jax.Array]
"""The rest of the network after the explained layer: features `(N, h, w, K)` -> logits
`(N, C)`, pure and strictly per sample."""
LogitsFn = Callable[[jax.Array], jax.Array]
"""The whole network: images `(N, H, W, C)` -> logits `(N, C)`, per sample."""
Targets = jax.Array | Callable[[jax.Array], jax.Array]
"""What a map explains: int class indices `(N,)`, or a per-sample `scores_fn(logits (N, C))
-> (N,)` whose row i depends only on logits row i."""


def at_least_float32(x: jax.Array) -> jax.Array:
  """x in float32, or in its own dtype where that is wider (float64 under x64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def target_scores(logits: jax.Array, targets: Targets) -> jax.Array:
  """S `(N,)`: the logit of class `targets[i]` for indices, the callable's value otherwise."""
  if callable(targets):
    return targets(logits)
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def head_gradients(
  head_fn: HeadFn, features: jax.Array, targets: Targets
) -> tuple[jax.Array, jax.Array]:
  """Logits `(N, C)` and G = d target_scores / d features `(N, h, w, K)`, per sample: one
  VJP, with the one-hot cotangent of the logits for indices and a cotangent of ones on the
  callable's scores otherwise."""
  if not callable(targets):
    logits, vjp = jax.vjp(head_fn, features)
    (grads,) = vjp(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
    return logits, grads

  def scores_and_logits(a):
    logits = head_fn(a)
    return targets(logits), logits

  scores, vjp, logits = jax.vjp(scores_and_logits, features, has_aux=True)
  (grads,) = vjp(jnp.ones_like(scores))
  return logits, grads


def channel_combination(features: jax.Array, weights: jax.Array) -> jax.Array:
  """ReLU(sum_k w_k A_k): maps `(..., h, w)` from features `(..., h, w, K)` and channel
  weights `(..., K)`, the last step of every CAM method."""
  cam_map = jnp.einsum('...hwk,...k->...hw', at_least_float32(features), at_least_float32(weights))
  return jax.nn.relu(cam_map)


def weighted_activation(features: jax.Array, grads: jax.Array) -> jax.Array:
  """ReLU(sum_k alpha_k A_k) with alpha = spatial mean of G: Grad-CAM's map `(..., h, w)`."""
  return channel_combination(features, jnp.mean(grads, axis=(-3, -2)))


def cam(features: jax.Array, class_weights: jax.Array, targets: jax.Array) -> jax.Array:
  """CAM (Zhou et al. 2016) for a global-average-pool + dense head: ReLU(sum_k W[k, t] A_k).

  `class_weights` is the dense kernel `(K, C)`. For such a head Grad-CAM's weights are
  W[k, t] / (h w) at every position, so `cam == h * w * grad_cam` exactly.
  """
  return channel_combination(features, jnp.take(class_weights, targets, axis=1).T)


def grad_cam(head_fn: HeadFn, features: jax.Array, targets: Targets) -> jax.Array:
  """Grad-CAM maps `(N, h, w)` of `targets` (class `targets[i]` or the callable's score) for
  every sample i, in one VJP."""
  _, grads = head_gradients(head_fn, features, targets)
  return weighted_activation(features, grads)


def grad_cam_pp(
  head_fn: HeadFn, features: jax.Array, targets: Targets, eps: float = 1e-6
) -> jax.Array:
  """Grad-CAM++ maps `(N, h, w)` (Chattopadhay et al. 2018), in one VJP.

  With the exponential of the class score, the 2nd and 3rd derivatives are powers of the
  first, g = dS/dA: alpha = g^2 / (2 g^2 + sum_ij(A) g^3) (0 where g = 0), channel weights
  w_k = sum_ij alpha ReLU(g), map ReLU(sum_k w_k A_k) — pytorch-grad-cam's form and eps.
  """
  _, grads = head_gradients(head_fn, features, targets)
  a, g = at_least_float32(features), at_least_float32(grads)
  g2 = jnp.square(g)
  activation_sums = jnp.sum(a, axis=(-3, -2), keepdims=True)
  alpha = jnp.where(g != 0, g2 / (2 * g2 + activation_sums * g2 * g + eps), 0.0)
  return channel_combination(a, jnp.sum(alpha * jax.nn.relu(g), axis=(-3, -2)))


def xgrad_cam(
  head_fn: HeadFn, features: jax.Array, targets: Targets, eps: float = 1e-7
) -> jax.Array:
  """XGrad-CAM maps `(N, h, w)` (Fu et al. 2020), in one VJP: channel weights
  w_k = sum_ij G A / (sum_ij A + eps), the gradient averaged with the activations as
  weights; pytorch-grad-cam's form and eps."""
  _, grads = head_gradients(head_fn, features, targets)
  a, g = at_least_float32(features), at_least_float32(grads)
  weights = jnp.sum(g * a, axis=(-3, -2)) / (jnp.sum(a, axis=(-3, -2)) + eps)
  return channel_combination(a, weights)


def hires_cam(head_fn: HeadFn, features: jax.Array, targets: Targets) -> jax.Array:
  """HiResCAM maps `(N, h, w)` (Draelos & Carin 2020), in one VJP: ReLU(sum_k G_k * A_k)
  position by position, the gradient not averaged over space. For a head that is linear in
  A (flatten + dense) the map before the ReLU sums to the target logit less the bias."""
  _, grads = head_gradients(head_fn, features, targets)
  return jax.nn.relu(jnp.sum(at_least_float32(grads) * at_least_float32(features), axis=-1))


def layer_cam(head_fn: HeadFn, features: jax.Array, targets: Targets) -> jax.Array:
  """LayerCAM maps `(N, h, w)` (Jiang et al. 2021), in one VJP: ReLU(sum_k ReLU(G_k) * A_k)
  position by position, only the positive gradients counting."""
  _, grads = head_gradients(head_fn, features, targets)
  positive = jax.nn.relu(at_least_float32(grads))
  return jax.nn.relu(jnp.sum(positive * at_least_float32(features), axis=-1))


def eigen_cam(features: jax.Array) -> jax.Array:
  """Eigen-CAM maps `(N, h, w)` (Muhammad & Yeasin 2020): no targets, no gradients.

  Per image, A as an `(h w, K)` matrix, centred per channel over the positions, projected
  onto its first right singular vector (one batched SVD). The singular vector's sign is
  arbitrary, so the projection is negated where |min| > |max| (pytorch-grad-cam's
  `get_2d_projection_with_sign_correction`, Seg-Eigen-CAM eq. 13): the map's larger-magnitude
  side is positive, whatever the SVD routine returns. Then ReLU. Differentiable where the
  first singular value is simple.
  """
  return first_component(features)


def _positive_side(projection: jax.Array) -> jax.Array:
  """Projections `(N, P)` negated where |min| > |max|: the larger-magnitude side positive
  (the sign of a singular or eigen vector is arbitrary). Then ReLU."""
  flip = jnp.abs(jnp.min(projection, axis=-1)) > jnp.abs(jnp.max(projection, axis=-1))
  return jax.nn.relu(jnp.where(flip[:, None], -projection, projection))


def first_component(values: jax.Array) -> jax.Array:
  """Per image, `values` `(N, h, w, K)` as an `(h w, K)` matrix centred per channel,
  projected onto its first right singular vector (one batched SVD), the sign corrected
  (`|min| > |max|` negates) and ReLU'd: maps `(N, h, w)`. The projection of Eigen-CAM,
  Eigen-Grad-CAM and Seg-Eigen-CAM (pytorch-grad-cam's
  `get_2d_projection_with_sign_correction`, then its ReLU)."""
  n, h, w, k = values.shape
  a = at_least_float32(values).reshape(n, h * w, k)
  a = a - jnp.mean(a, axis=1, keepdims=True)
  _, _, vt = jnp.linalg.svd(a, full_matrices=False)
  return _positive_side(jnp.einsum('npk,nk->np', a, vt[:, 0])).reshape(n, h, w)


def eigen_grad_cam(head_fn: HeadFn, features: jax.Array, targets: Targets) -> jax.Array:
  """Eigen-Grad-CAM maps `(N, h, w)` (pytorch-grad-cam's EigenGradCAM), in one VJP: the
  first principal component of G * A, the class-specific version of Eigen-CAM
  (`first_component`). pytorch-grad-cam leaves the component's sign to LAPACK; ours is
  corrected as Eigen-CAM's is."""
  _, grads = head_gradients(head_fn, features, targets)
  return first_component(at_least_float32(grads) * at_least_float32(features))


def seg_eigen_cam(head_fn: HeadFn, features: jax.Array, targets: Targets) -> jax.Array:
  """Seg-Eigen-CAM maps `(N, h, w)` (Chung & Ying 2025, eqs. 10-13), in one VJP: the first
  principal component of |G| * A (eq. 10: both signs of the gradient count, position by
  position), sign-corrected (eq. 13)."""
  _, grads = head_gradients(head_fn, features, targets)
  return first_component(jnp.abs(at_least_float32(grads)) * at_least_float32(features))


def grad_cam_elementwise(head_fn: HeadFn, features: jax.Array, targets: Targets) -> jax.Array:
  """Element-wise Grad-CAM maps `(N, h, w)` (pytorch-grad-cam's GradCAMElementWise), in one
  VJP: sum_k ReLU(G_k * A_k), each position and channel's product clipped before the sum
  (HiResCAM clips after it)."""
  _, grads = head_gradients(head_fn, features, targets)
  return jnp.sum(jax.nn.relu(at_least_float32(grads) * at_least_float32(features)), axis=-1)


def shapley_cam(head_fn: HeadFn, features: jax.Array, targets: Targets) -> jax.Array:
  """ShapleyCAM maps `(N, h, w)` (Cai 2025, arXiv 2501.06261): Grad-CAM whose gradient is
  corrected by the second-order term of a Shapley-value expansion, channel weights
  w_k = mean_ij (G - H A / 2)_k with H the Hessian of the target score in A. H A is one
  forward-over-reverse product (`jax.jvp` of the VJP), batched like G. For a head linear in
  A (GAP + dense) H = 0 and the maps are Grad-CAM's."""
  a = at_least_float32(features)
  grads_of = lambda x: head_gradients(head_fn, x, targets)[1]
  grads, hessian_a = jax.jvp(grads_of, (a,), (a,))
  weights = jnp.mean(grads - 0.5 * hessian_a, axis=(-3, -2))
  return channel_combination(a, weights)


def finer_target(
  targets: jax.Array, alpha: float = 1.0, comparisons: tuple[int, ...] = (1, 2, 3)
) -> Callable[[jax.Array], jax.Array]:
  """Finer-CAM's target score (Zhang et al. 2025, arXiv 2501.11309), a per-sample callable
  on the logits: with t = targets[i] and c_j the classes whose logits are nearest to t's
  (ranked by |S_c - S_t|; rank 0 is t itself, `comparisons` the ranks compared with),

      S_i = sum_j p_j (S_t - alpha S_cj) / (sum_j p_j + 1e-9),   p = softmax(S),

  differentiated through p as well, as pytorch-grad-cam's `FinerWeightedTarget` is. The
  explanation then shows what tells t from its look-alikes."""
  ranks = jnp.asarray(comparisons)

  def score(logits):
    s = at_least_float32(logits)
    main = jnp.take_along_axis(s, targets[:, None], axis=-1)
    order = jnp.argsort(jax.lax.stop_gradient(jnp.abs(s - main)), axis=-1)
    nearest = order[:, jnp.clip(ranks, 0, s.shape[-1] - 1)]
    p = jnp.take_along_axis(jax.nn.softmax(s, axis=-1), nearest, axis=-1)
    others = jnp.take_along_axis(s, nearest, axis=-1)
    valid = ranks < s.shape[-1]  # fewer classes than ranks: pytorch-grad-cam's clamp
    p = jnp.where(valid, p, 0.0)
    return jnp.sum(p * (main - alpha * others), axis=-1) / (jnp.sum(p, axis=-1) + 1e-9)

  return score


def finer_cam(
  head_fn: HeadFn,
  features: jax.Array,
  targets: jax.Array,
  alpha: float = 1.0,
  comparisons: tuple[int, ...] = (1, 2, 3),
) -> jax.Array:
  """Finer-CAM maps `(N, h, w)` (Zhang et al. 2025): Grad-CAM of `finer_target`, the
  target's logit against those of the classes most like it, so the map keeps what
  distinguishes the class and drops what it shares with its look-alikes. `targets` are
  class indices; `alpha=0` gives Grad-CAM of the target logit. pytorch-grad-cam's FinerCAM
  with its default targets (the predicted class)."""
  return grad_cam(head_fn, features, finer_target(targets, alpha, comparisons))


def fem(features: jax.Array, k: float = 2.0) -> jax.Array:
  """FEM maps `(N, h, w)` (Fuad et al. 2020, Feature Explanation Method): no targets, no
  gradients. Channel k's weight is the share of its positions above its own mean plus
  `k` standard deviations (the k-sigma rule; population std), the map sum_k w_k A_k, then
  ReLU, as pytorch-grad-cam's FEM."""
  a = at_least_float32(features)
  mean = jnp.mean(a, axis=(-3, -2), keepdims=True)
  threshold = mean + k * jnp.std(a, axis=(-3, -2), keepdims=True)
  weights = jnp.mean((a > threshold).astype(a.dtype), axis=(-3, -2))
  return channel_combination(a, weights)


KPCA_KERNELS = ('sigmoid', 'rbf', 'poly', 'linear', 'cosine')


def _kernel_matrix(x: jax.Array, kernel: str, gamma: float | None) -> jax.Array:
  """scikit-learn's pairwise kernels of the rows of `x` `(N, P, K)`: `(N, P, P)`, with its
  defaults (gamma 1/K, coef0 1, degree 3)."""
  gamma = 1.0 / x.shape[-1] if gamma is None else gamma
  dots = jnp.einsum('npk,nqk->npq', x, x)
  if kernel == 'linear':
    return dots
  if kernel == 'sigmoid':
    return jnp.tanh(gamma * dots + 1.0)
  if kernel == 'poly':
    return (gamma * dots + 1.0) ** 3
  squares = jnp.einsum('npk,npk->np', x, x)
  if kernel == 'rbf':
    distances = squares[:, :, None] + squares[:, None, :] - 2 * dots
    return jnp.exp(-gamma * jnp.maximum(distances, 0.0))
  if kernel == 'cosine':
    norms = jnp.sqrt(jnp.maximum(squares, 1e-30))
    return dots / (norms[:, :, None] * norms[:, None, :])
  raise ValueError(f'kernel={kernel!r}; expected one of {", ".join(KPCA_KERNELS)}')


def kpca_cam(features: jax.Array, kernel: str = 'sigmoid', gamma: float | None = None) -> jax.Array:
  """KPCA-CAM maps `(N, h, w)` (Karmani et al. 2024, arXiv 2410.00267): Eigen-CAM with
  kernel PCA; no targets, no gradients. Per image, the positions' centred features
  `(h w, K)` give the kernel matrix (`kernel`, scikit-learn's with its defaults), centred in
  feature space; the map is the first component's projection sqrt(lambda_1) u_1 (one
  batched `eigh`), its sign corrected as Eigen-CAM's (scikit-learn's rule: the largest
  |entry| positive), then ReLU. pytorch-grad-cam's KPCA_CAM through `KernelPCA(1)`."""
  n, h, w, k = features.shape
  x = at_least_float32(features).reshape(n, h * w, k)
  x = x - jnp.mean(x, axis=1, keepdims=True)
  kmat = _kernel_matrix(x, kernel, gamma)
  kmat = (
    kmat
    - jnp.mean(kmat, axis=1, keepdims=True)
    - jnp.mean(kmat, axis=2, keepdims=True)
    + jnp.mean(kmat, axis=(1, 2), keepdims=True)
  )
  values, vectors = jnp.linalg.eigh(kmat)  # ascending
  projection = vectors[:, :, -1] * jnp.sqrt(jnp.maximum(values[:, -1:], 0.0))
  return _positive_side(projection).reshape(n, h, w)


DFF_COMPONENTS = 5
"""Deep Feature Factorization's concepts per image by default: pytorch-grad-cam's `dff` and
`run_dff_on_image` (its `DeepFeatureFactorization.__call__` alone defaults to 16)."""


class ConceptFactorization(NamedTuple):
  """Deep Feature Factorization of a layer's features `(N, h, w, K)` into n concepts.

  Attributes:
    concepts: `(N, K, n)`, column j concept j in feature space (NMF's W plus the per-channel
      offset subtracted before the factorization); with `joint=True` the batch's shared
      concepts, the same for every image.
    explanations: `(N, n, h, w)` >= 0, where each concept is in each image (NMF's H).
    scores: `(N, n, C)`, the logits of each concept (`concept_scores`; pytorch-grad-cam's
      `concept_outputs`, whose softmax its `run_dff_on_image` shows), or None without a head.
    n_iter: NMF iterations, `(N,)` (`(1,)` with `joint=True`).
  """

  concepts: jax.Array
  explanations: jax.Array
  scores: jax.Array | None
  n_iter: jax.Array


def concept_scores(head_fn: HeadFn, concepts: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Logits `(N, n, C)` of each concept `(N, K, n)`: the head on the concept as a constant
  feature map of `size` (h, w), one `vmap`ped head call for the n concepts of all images.
  For a global-average-pool + dense head that is the dense layer on the concept vector,
  what pytorch-grad-cam's `computation_on_concepts` (e.g. `model.fc`) gets."""
  n_images, channels, n = concepts.shape
  maps = jnp.moveaxis(concepts, -1, 0)[:, :, None, None, :]
  maps = jnp.broadcast_to(maps, (n, n_images) + tuple(size) + (channels,))
  return jnp.moveaxis(jax.vmap(head_fn)(maps), 0, 1)


def deep_feature_factorization(
  features: jax.Array,
  n_components: int = DFF_COMPONENTS,
  head_fn: HeadFn | None = None,
  *,
  joint: bool = False,
  tol: float = 1e-4,
  max_iter: int = 200,
) -> ConceptFactorization:
  """Deep Feature Factorization (Collins et al. 2018, arXiv 1806.10206): the layer's
  activations as a `(K, h w)` matrix factorized into n non-negative concepts, W `(K, n)`
  (what each concept is in feature space) times H `(n, h w)` (where it is); no targets, no
  gradients. As pytorch-grad-cam's `DeepFeatureFactorization`: NaNs set to 0, each
  channel's minimum subtracted (NMF needs X >= 0) and added back to the concepts,
  scikit-learn's `NMF(n_components, init='random', random_state=0)` (`bcam_jax.nmf`, its
  coordinate descent to `tol` or `max_iter` iterations), and with `head_fn` each concept's
  class logits (`concept_scores`).

  Per image by default (each image its own concepts, so a map does not depend on the other
  images of the batch); `joint=True` factorizes the batch as one `(K, N h w)` matrix, one
  set of concepts for all images, which is what pytorch-grad-cam does with a batch (and the
  same for one image). Not reverse-differentiable (the NMF is a `lax.while_loop`).
  """
  n_images, h, w, channels = features.shape
  a = at_least_float32(features)
  a = jnp.where(jnp.isnan(a), 0, a)
  x = jnp.moveaxis(a, -1, 0).reshape(channels, n_images, h * w)  # (K, N, h w)
  if joint:
    x = x.reshape(1, channels, n_images * h * w)
  else:
    x = jnp.moveaxis(x, 1, 0)  # (N, K, h w)
  offset = jnp.min(x, axis=-1, keepdims=True)
  factors = nmf.nmf(x - offset, n_components, tol=tol, max_iter=max_iter)
  concepts = factors.w + offset
  explanations = factors.h.reshape(-1, n_components, n_images if joint else 1, h, w)
  explanations = jnp.moveaxis(explanations, 2, 1).reshape(n_images, n_components, h, w)
  concepts = jnp.broadcast_to(concepts, (n_images, channels, n_components))
  scores = None
  if head_fn is not None:
    scores = concept_scores(head_fn, concepts.astype(features.dtype), (h, w))
  return ConceptFactorization(concepts, explanations, scores, factors.n_iter)


def dff_cam(
  head_fn: HeadFn,
  features: jax.Array,
  targets: jax.Array,
  n_components: int = DFF_COMPONENTS,
  joint: bool = False,
) -> jax.Array:
  """Deep Feature Factorization as one map per image `(N, h, w)`: the explanation (H row)
  of the image's concept that the head scores highest for class `targets[i]`, by the
  softmax over the classes of the concept's logits (the scores pytorch-grad-cam's
  `run_dff_on_image` labels the concepts with). pytorch-grad-cam has no map per class (its
  `show_factorization_on_image` colours every concept); this choice makes DFF one more
  method of `explain.METHODS`. `deep_feature_factorization` gives all the concepts."""
  factorization = deep_feature_factorization(features, n_components, head_fn, joint=joint)
  probs = jax.nn.softmax(at_least_float32(factorization.scores), axis=-1)
  target_probs = jnp.take_along_axis(probs, targets[:, None, None], axis=-1)[..., 0]
  best = jnp.argmax(target_probs, axis=-1)  # (N,): the first concept on ties
  return jnp.take_along_axis(factorization.explanations, best[:, None, None, None], axis=1)[:, 0]


def refine_cam(layer_maps: jax.Array) -> jax.Array:
  """RefineCAM's fusion (Domeniconi et al. 2026, arXiv 2605.14641) of one method's maps at
  several layers, `(L, N, H, W)` each at image size and in [0, 1]: their product, min-max
  scaled, so a position stays only where every layer marks it; it denoises early layers'
  maps with the later layers' coarse ones. `Explainer(..., layer=[...], fusion='product')`
  applies it to any method (pytorch-grad-cam's RefineCAM: Grad-CAM++ by default)."""
  return normalize_cam(jnp.prod(at_least_float32(layer_maps), axis=0))


def target_probability(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Softmax probability of class `targets[i]` for each row of `logits` `(..., C)`."""
  probs = jax.nn.softmax(at_least_float32(logits), axis=-1)
  return jnp.take_along_axis(probs, targets[..., None], axis=-1)[..., 0]


def _repeat_targets(targets: Targets, times: int) -> Targets:
  """The targets of `N * times` rows, sample i's `times` rows in a row; a per-sample
  callable serves any rows unchanged."""
  return targets if callable(targets) else jnp.repeat(targets, times)


def _per_channel(
  chunk_scores: Callable[[jax.Array], jax.Array], k: int, chunk_size: int
) -> jax.Array:
  """Scores `(N, K)` of every channel from `chunk_scores(channels (chunk,)) -> (N, chunk)`,
  in a `lax.map` over chunks of `chunk_size` channel indices, so memory is bounded whatever
  K. The last chunk is padded with the out-of-range index K, whose scores are dropped."""
  chunk = max(1, min(chunk_size, k))
  n_chunks = -(-k // chunk)
  scores = jax.lax.map(chunk_scores, jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk))
  return scores.transpose(1, 0, 2).reshape(scores.shape[1], n_chunks * chunk)[:, :k]


def score_cam(
  logits_fn: LogitsFn,
  images: jax.Array,
  features: jax.Array,
  targets: Targets,
  chunk_size: int = 32,
  channel_softmax: bool = False,
) -> jax.Array:
  """Score-CAM maps `(N, h, w)` (Wang et al. 2020): no gradients, K masked forward passes.

  Channel k's map, upsampled to the image size and min-max normalised to [0, 1], masks
  the images `(N, H, W, C)` (`images * mask`, so `images` should be in the space where 0
  means "removed", e.g. [0, 1] pixels with `logits_fn` normalising), giving score s_k of the
  masked image. By default s_k is the softmax probability of the target class (for a
  callable, its value) and the weight is s_k, as in the official Score-CAM code.
  `channel_softmax=True` is pytorch-grad-cam's ScoreCAM: s_k is the target logit (for a
  callable, its value) and the weights are the softmax of s over the K channels.
  `chunk_size` channels of all N images go through `logits_fn` per call
  (`N * chunk_size` images), in a `lax.map` over the chunks, so memory is bounded whatever K.
  """
  n, k = features.shape[0], features.shape[-1]
  a = at_least_float32(features)
  use_logits = callable(targets) or channel_softmax
  score_fn = target_scores if use_logits else target_probability

  def chunk_scores(channels):  # (chunk,) -> (N, chunk)
    chunk = channels.shape[0]
    maps = jnp.moveaxis(jnp.take(a, channels, axis=-1, mode='fill', fill_value=0), -1, 1)
    masks = normalize_cam(upsample_cam(maps, images.shape[1:3])).astype(images.dtype)
    masked = images[:, None] * masks[..., None]
    logits = logits_fn(masked.reshape((n * chunk,) + images.shape[1:]))
    scores = score_fn(logits, _repeat_targets(targets, chunk))
    return at_least_float32(scores).reshape(n, chunk)

  scores = _per_channel(chunk_scores, k, chunk_size)
  return channel_combination(a, jax.nn.softmax(scores, axis=-1) if channel_softmax else scores)


def ablation_cam(
  head_fn: HeadFn, features: jax.Array, targets: Targets, chunk_size: int = 32
) -> jax.Array:
  """Ablation-CAM maps `(N, h, w)` (Desai & Ramaswamy 2020): no gradients, K passes of the
  features through `head_fn`, channel k zeroed in pass k.

  With S the target score (`target_scores`) and S_k that with channel k ablated, channel
  k's weight is the relative drop (S - S_k) / S (0 where S = 0), pytorch-grad-cam's rule
  (which ablates with min(A) - 1e7 rather than 0 where the layer's minimum is not 0).
  `chunk_size` channels of all N samples go through `head_fn` per call
  (`N * chunk_size` feature sets), in a `lax.map` over the chunks, so memory is bounded
  whatever K.
  """
  n, h, w, k = features.shape
  scores = at_least_float32(target_scores(head_fn(features), targets))[:, None]

  def chunk_scores(channels):  # (chunk,) -> (N, chunk)
    chunk = channels.shape[0]
    ablate = channels[:, None] == jnp.arange(k)  # (chunk, K); the padding index K: none
    ablated = jnp.where(ablate[:, None, None, :], 0, features[:, None])  # (N, chunk, h, w, K)
    logits = head_fn(ablated.reshape((n * chunk, h, w, k)))
    return at_least_float32(target_scores(logits, _repeat_targets(targets, chunk))).reshape(
      n, chunk
    )

  drops = scores - _per_channel(chunk_scores, k, chunk_size)
  weights = jnp.where(scores != 0, drops / jnp.where(scores != 0, scores, 1), 0)
  return channel_combination(features, weights)


def class_sums(
  values: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """Per-class sums of `values` `(N, ...)` and the class counts `(C,)`, by
  `jax.ops.segment_sum` on the labels. Under `jit` over a sharded batch the sums are over
  the global batch; sums of several batches add up to those of their union."""
  values = at_least_float32(values)
  counts = jax.ops.segment_sum(jnp.ones(labels.shape, values.dtype), labels, num_classes)
  return jax.ops.segment_sum(values, labels, num_classes), counts


def batch_cam_from_sums(
  feature_sums: jax.Array, grad_sums: jax.Array, counts: jax.Array
) -> jax.Array:
  """Batch-CAM maps `(C, h, w)` from per-class sums of A and G and the class counts.

  A_bar_c = sum A / N_c and G_bar_c = sum G / N_c (eqs. 4-5; zero for absent classes),
  alpha_c = spatial mean of G_bar_c (eq. 6), M_c = ReLU(sum_k alpha_ck A_bar_ck).
  """
  scale = (1.0 / jnp.maximum(counts, 1.0)).reshape((-1,) + (1,) * (feature_sums.ndim - 1))
  return weighted_activation(feature_sums * scale, grad_sums * scale)


def batch_cam_from_gradients(
  features: jax.Array, grads: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """Batch-CAM from the batch's features A and their gradients G: (cams `(C, h, w)`,
  counts `(C,)`)."""
  feature_sums, counts = class_sums(features, labels, num_classes)
  grad_sums, _ = class_sums(grads, labels, num_classes)
  return batch_cam_from_sums(feature_sums, grad_sums, counts), counts


def batch_cam(
  head_fn: HeadFn, features: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """Class-averaged Grad-CAM of a batch: (cams `(C, h, w)`, counts `(C,)`)."""
  _, grads = head_gradients(head_fn, features, labels)
  return batch_cam_from_gradients(features, grads, labels, num_classes)


def normalize_cam(maps: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Per-map min-max scaling of `(..., h, w)` maps to [0, 1]; a constant map gives zeros."""
  low = jnp.min(maps, axis=(-2, -1), keepdims=True)
  high = jnp.max(maps, axis=(-2, -1), keepdims=True)
  return (maps - low) / jnp.maximum(high - low, eps)


def upsample_cam(maps: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """Bilinear resize of `(..., h, w)` maps to `size` (the prototypes' resolution)."""
  size = (size, size) if isinstance(size, int) else tuple(size)
  return jax.image.resize(maps, maps.shape[:-2] + size, method='bilinear')
