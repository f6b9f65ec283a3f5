"""Explain your own Flax linen CNN with bcam_jax: Grad-CAM, Score-CAM, Layer-CAM and
Ablation-CAM, jitted, with their faithfulness and a check that they point at the object.

The data are synthetic (`examples/squares.py`): coloured noise with one square at a
random position whose colour
says the class (0 red, 1 green, 2 blue, 3 yellow). A CNN that solves the task has to look
at the square, so a right explanation puts its mass inside the square; the script prints
that fraction next to Average Drop / Increase and insertion / deletion.

The model is an ordinary linen module (nothing from `bcam_jax.models`); the explainer
reaches its layer by module path (`layer='conv3'`), with no change to the model.

Run from the clone's root (about 30 s on 2 CPU cores), with bcam_jax installed
(`pip install -e .`) or importable (`PYTHONPATH=.`):

    python examples/explain_linen_cnn.py
    python examples/explain_linen_cnn.py --steps=600 --out_dir=/tmp/cams
"""

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import squares  # the synthetic task and training loop, beside this script

from bcam_jax import cam, explain
from bcam_jax.explain import faithfulness
from bcam_jax.report import figures

METHODS = ('grad_cam', 'score_cam', 'layer_cam', 'ablation_cam')


class SmallCNN(nn.Module):
  """conv -> conv (stride 2) -> conv -> global average pool -> dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2, name='conv2')(x))
    x = nn.relu(nn.Conv(16, (3, 3), name='conv3')(x))  # 12x12x16: the layer we explain
    return nn.Dense(len(squares.CLASSES), name='head')(x.mean(axis=(1, 2)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=200, help='training steps')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--n_explain', type=int, default=32, help='test images explained')
  parser.add_argument('--out_dir', default='./example_outputs')
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  start = time.time()

  train_x, train_y, _ = squares.make_data(0, 2048)
  test_x, test_y, test_masks = squares.make_data(1, 256)
  net = SmallCNN()
  print(f'training SmallCNN for {args.steps} steps on {train_x.shape[0]} synthetic images')
  variables = squares.train(
    net, train_x, train_y, args.steps, args.batch, jax.random.key(2), optax.adam(3e-3)
  )

  # The explainer takes [0, 1] pixels and normalises them as the model was trained.
  explainer = explain.Explainer(net, squares.MEAN, squares.STD, layer='conv3')
  logits = jax.jit(explainer.logits)(variables, test_x)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test_y))
  print(f'test accuracy: {accuracy:.3f}')
  print('layers the explainer can explain:', explainer.layer_shapes(variables, test_x[:1]))

  pixels, labels, masks = test_x[: args.n_explain], test_y[: args.n_explain], test_masks
  masks = masks[: args.n_explain]
  maps_fn = jax.jit(explainer.maps, static_argnums=0)  # method name static, the rest traced

  @jax.jit
  def scores(variables, pixels, labels, masks, maps):
    """Faithfulness of [0, 1] maps at image size, and their mass inside the square."""
    logits_fn = lambda p: explainer.logits(variables, p)
    y = cam.target_probability(logits_fn(pixels), labels)
    o = cam.target_probability(logits_fn(faithfulness.mask_with_saliency(pixels, maps)), labels)
    metrics = faithfulness.drop_gain_increase(y, o)
    # CA-Stream's insertion/deletion, but 16 equal steps: deleted pixels and the blur's
    # padding become the normalisation mean (0 for the model).
    metrics |= faithfulness.insertion_deletion(
      logits_fn, pixels, maps, labels, n_steps=16, baseline=squares.MEAN
    )
    metrics['in_square'] = squares.mass_in_square(maps, masks)
    return {k: jnp.mean(v) for k, v in metrics.items()}

  print(f'\nexplaining {pixels.shape[0]} test images at layer conv3, target = the label')
  print(f'the square covers {float(masks.mean()):.1%} of each image (a uniform map scores that)')
  header = f'{"method":<14}{"drop":>8}{"increase":>10}{"insertion":>11}{"deletion":>10}'
  print(header + f'{"in-square":>11}')
  shown = {}
  for method in METHODS:
    maps = maps_fn(method, variables, pixels, labels)
    m = scores(variables, pixels, labels, masks, maps)
    print(
      f'{method:<14}{float(m["average_drop"]):8.1f}{float(m["average_increase"]):10.1f}'
      f'{float(m["insertion"]):11.3f}{float(m["deletion"]):10.3f}{float(m["in_square"]):11.1%}'
    )
    shown[method] = maps[:6]
  print('(drop: lower is better; increase, insertion: higher; deletion: lower)')
  path = os.path.join(args.out_dir, 'explain_linen_cnn.png')
  predictions = jnp.argmax(logits[:6], -1)
  title = 'SmallCNN at conv3: maps of the true class over the first 6 test images'
  figures.save_overlays(path, pixels[:6], shown, labels[:6], predictions, squares.CLASSES, title)
  # Or as arrays, for your own figures: images with the map blended over them, RGB [0, 1].
  overlays = explain.show_cam_on_image(pixels[:6], shown['grad_cam'])
  print(f'wrote {path}  (rows: images; columns: {", ".join(METHODS)}); overlays {overlays.shape}')
  print(f'done in {time.time() - start:.1f} s')


if __name__ == '__main__':
  main()
