"""Weights files for tests, written from numpy: torchvision-layout ResNet state_dicts of any
depth and width (random weights and BatchNorm statistics), as `.safetensors` files."""

import numpy as np
import pytest

# Blocks per stage, and whether the blocks are Bottlenecks (torchvision's resnet*).
_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def resnet_arrays(depth=18, width=2, classes=3, channels=3, seed=0):
  """A ResNet-`depth` state_dict in torchvision's names and layouts (OIHW convs, `fc` as
  (out, in)), with stage widths `width` x 1, 2, 4, 8 (64 in the published models)."""
  rng = np.random.default_rng(seed)
  arrays = {}

  def conv(key, out, inp, k):
    weight = rng.normal(size=(out, inp, k, k)) / np.sqrt(inp * k * k)  # outputs of order 1
    arrays[key + '.weight'] = weight.astype(np.float32)

  def bn(key, c):
    arrays[f'{key}.weight'] = rng.uniform(0.5, 1.5, size=c).astype(np.float32)
    arrays[f'{key}.bias'] = rng.normal(size=c).astype(np.float32) * 0.1
    arrays[f'{key}.running_mean'] = rng.normal(size=c).astype(np.float32) * 0.1
    arrays[f'{key}.running_var'] = rng.uniform(0.5, 1.5, size=c).astype(np.float32)
    arrays[f'{key}.num_batches_tracked'] = np.array(3, np.int64)

  bottleneck = depth >= 50
  expansion = 4 if bottleneck else 1
  conv('conv1', width, channels, 7)
  bn('bn1', width)
  inp = width
  for i, (mult, blocks) in enumerate(zip((1, 2, 4, 8), _STAGES[depth]), start=1):
    mid = width * mult
    out = mid * expansion
    for j in range(blocks):
      prefix = f'layer{i}.{j}'
      cin = inp if j == 0 else out
      if bottleneck:
        conv(f'{prefix}.conv1', mid, cin, 1)
        bn(f'{prefix}.bn1', mid)
        conv(f'{prefix}.conv2', mid, mid, 3)
        bn(f'{prefix}.bn2', mid)
        conv(f'{prefix}.conv3', out, mid, 1)
        bn(f'{prefix}.bn3', out)
      else:
        conv(f'{prefix}.conv1', out, cin, 3)
        bn(f'{prefix}.bn1', out)
        conv(f'{prefix}.conv2', out, out, 3)
        bn(f'{prefix}.bn2', out)
      if j == 0 and (cin != out or i > 1):  # torchvision's downsample rule
        conv(f'{prefix}.downsample.0', out, cin, 1)
        bn(f'{prefix}.downsample.1', out)
    inp = out
  arrays['fc.weight'] = rng.normal(size=(classes, inp)).astype(np.float32)
  arrays['fc.bias'] = rng.normal(size=classes).astype(np.float32)
  return arrays


def save_safetensors(arrays, path) -> str:
  """`arrays` written to `path` by safetensors' numpy API (the test skipped without it)."""
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  safetensors_numpy.save_file(arrays, str(path))
  return str(path)
