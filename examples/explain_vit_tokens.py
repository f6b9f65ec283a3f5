"""Explain a ViT-style Flax linen model at a transformer block's token output.

A block of a ViT outputs tokens `(N, 1 + s*s, D)`, not an image-shaped map. With
`prefix_tokens=1` the explainer drops the class token (holding it fixed in the rest of the
network) and reshapes the s*s patch tokens, in row-major order as the patch embedding made
them, into an `(N, s, s, D)` grid; every CAM method then works on that grid (this is the
`reshape_transform` pytorch-grad-cam asks its users to write). Here the images are 24x24
with 4x4 patches, so block outputs are `(N, 37, 32)` and the maps 6x6.

Explain the output of a block before the last one (here block1 of two): only the class
token of the last block's output reaches the head, so the gradient on its patch tokens is
zero and Grad-CAM there is empty. The patch tokens of block1 reach the class token through
block2's attention.

The data are synthetic (`examples/squares.py`): coloured noise with one square at a
random position whose colour
says the class (0 red, 1 green, 2 blue, 3 yellow); a right explanation lands on the square
and the script prints the fraction of each map's mass inside it, for Grad-CAM, HiRes-CAM,
Layer-CAM and Eigen-CAM. On token layers Grad-CAM's one weight per channel (the gradient
averaged over all patches) is often a poor fit; the element-wise methods, HiRes-CAM and
Layer-CAM, which weight each patch by its own gradient, usually land closer to the object.

Run from the clone's root (about 30 s on 2 CPU cores), with bcam_jax installed
(`pip install -e .`) or importable (`PYTHONPATH=.`):

    python examples/explain_vit_tokens.py
    python examples/explain_vit_tokens.py --steps=600 --out_dir=/tmp/vit
"""

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import squares  # the synthetic task and training loop, beside this script

from bcam_jax import explain
from bcam_jax.report import figures

PATCH, DIM = 4, 32
METHODS = ('grad_cam', 'hires_cam', 'layer_cam', 'eigen_cam')


class Block(nn.Module):
  """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=4)(nn.LayerNorm()(x))
    y = nn.Dense(DIM)(nn.gelu(nn.Dense(2 * DIM)(nn.LayerNorm()(x))))
    return x + y


class Embed(nn.Module):
  """Patch embedding (a strided conv), a class token and position embeddings: tokens
  `(N, 1 + s*s, D)`, the class token first, then the patches in row-major order."""

  @nn.compact
  def __call__(self, x):
    patches = nn.Conv(DIM, (PATCH, PATCH), strides=PATCH)(x)  # (N, 6, 6, D)
    n, h, w, d = patches.shape
    tokens = patches.reshape(n, h * w, d)  # row-major patches, as token_grid expects
    cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)), tokens], axis=1)
    return tokens + self.param('pos', nn.initializers.normal(0.02), (1, 1 + h * w, d))


class TinyViT(nn.Module):
  """Embedding, two transformer blocks and the class token's logits."""

  @nn.compact
  def __call__(self, x):
    tokens = Embed(name='embed')(x)  # (N, 37, D)
    tokens = Block(name='block1')(tokens)  # (N, 37, D)
    tokens = Block(name='block2')(tokens)
    return nn.Dense(len(squares.CLASSES), name='head')(nn.LayerNorm(name='norm')(tokens[:, 0]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300, help='training steps')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--out_dir', default='./example_outputs')
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  start = time.time()

  train_x, train_y, _ = squares.make_data(0, 2048)
  test_x, test_y, test_masks = squares.make_data(1, 64)
  net = TinyViT()
  print(f'training TinyViT for {args.steps} steps on {train_x.shape[0]} synthetic images')
  variables = squares.train(
    net,
    train_x,
    train_y,
    args.steps,
    args.batch,
    jax.random.key(2),
    optax.adamw(3e-3, weight_decay=1e-4),
  )

  # prefix_tokens=1: block1's (N, 37, D) tokens -> class token dropped, (N, 6, 6, D) grid.
  explainer = explain.Explainer(net, squares.MEAN, squares.STD, layer='block1', prefix_tokens=1)
  logits = jax.jit(explainer.logits)(variables, test_x)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test_y))
  print(f'test accuracy: {accuracy:.3f}')
  shapes = explainer.layer_shapes(variables, test_x[:1])
  print(f'block1 output (tokens): {shapes["block1"]}')
  grid = jax.eval_shape(lambda v, p: explainer.features(v, p)[0], variables, test_x[:1])
  print(f'block1 as explained (patch grid): {tuple(grid.shape)}')

  maps_fn = jax.jit(explainer.maps, static_argnums=0)
  print(f'the square covers {test_masks.mean():.1%} of each image (a uniform map scores that)')
  print(f'{"method":<12}{"in-square":>11}')
  shown = {}
  for method in METHODS:
    maps = maps_fn(method, variables, test_x, test_y)  # upsampled from 6x6 to 24x24
    in_square = squares.mass_in_square(maps, test_masks)
    print(f'{method:<12}{float(in_square.mean()):11.1%}')
    shown[method] = maps[:6]

  path = os.path.join(args.out_dir, 'explain_vit_tokens.png')
  title = 'TinyViT at block1 (6x6 patch tokens): maps of the true class'
  predictions = jnp.argmax(logits[:6], -1)
  figures.save_overlays(path, test_x[:6], shown, test_y[:6], predictions, squares.CLASSES, title)
  print(f'wrote {path}  (rows: images; columns: {", ".join(METHODS)})')
  print(f'done in {time.time() - start:.1f} s')


if __name__ == '__main__':
  main()
