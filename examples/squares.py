"""The synthetic task of the linen and ViT examples, and their plain optax training loop.

Coloured noise with one square at a random position whose colour says the class (0 red,
1 green, 2 blue, 3 yellow): a model that solves it has to look at the square, so a right
explanation puts its mass inside the square (`mass_in_square`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

CLASSES = ('red', 'green', 'blue', 'yellow')
SIZE, SQUARE = 24, 6
MEAN, STD = 0.3, 0.3  # the input normalisation the models are trained with


def make_data(seed, n):
  """n images `(n, 24, 24, 3)` in [0, 1], their labels `(n,)` and square masks `(n, 24, 24)`."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, len(CLASSES), n)
  top, left = rng.integers(0, SIZE - SQUARE + 1, (2, n, 1, 1))
  rows, cols = np.arange(SIZE)[None, :, None], np.arange(SIZE)[None, None, :]
  masks = (rows >= top) & (rows < top + SQUARE) & (cols >= left) & (cols < left + SQUARE)
  noise = rng.uniform(size=(n, SIZE, SIZE, 3))
  colours = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])[labels]
  square = 0.2 + 0.45 * colours[:, None, None, :] + 0.35 * noise
  pixels = np.where(masks[..., None], square, 0.6 * noise).astype(np.float32)
  return pixels, labels, masks.astype(np.float32)


def train(net, pixels, labels, steps, batch, key, optimizer):
  """Plain optax training of a linen module on normalised pixels; returns the variables."""
  x = (pixels - MEAN) / STD
  variables = jax.jit(net.init)(key, x[:1])
  opt_state = optimizer.init(variables)

  @jax.jit
  def step(variables, opt_state, xb, yb):
    def loss_fn(v):
      return optax.softmax_cross_entropy_with_integer_labels(net.apply(v, xb), yb).mean()

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  rng = np.random.default_rng(0)
  log_at = set(np.linspace(0, steps - 1, 5).astype(int).tolist())  # five loss lines
  for i in range(steps):
    idx = rng.integers(0, x.shape[0], batch)
    variables, opt_state, loss = step(variables, opt_state, x[idx], labels[idx])
    if i in log_at:
      print(f'  step {i:4d}  loss {float(loss):.4f}')
  return variables


def mass_in_square(maps, masks):
  """The share of each [0, 1] map's mass `(N, H, W)` inside its square `(N,)`."""
  return jnp.sum(maps * masks, (1, 2)) / jnp.maximum(jnp.sum(maps, (1, 2)), 1e-8)
