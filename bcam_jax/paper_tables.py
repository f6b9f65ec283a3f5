"""The test accuracies (%) that the Batch-CAM paper reports, which grids are compared with.

Table 1 (28x28) and Table 2 (112x112) give, per model and dataset, the best condition and
its accuracy; section 4.1 also gives two baselines.
"""

from __future__ import annotations

# (model, dataset, image size) -> (best condition, its test accuracy %).
BEST = {
  ('convnext_v2_tiny', 'mnist', 28): ('bcpl-l1', 99.72),
  ('convnext_v2_tiny', 'fashion_mnist', 28): ('baseline', 94.79),
  ('resnet18', 'mnist', 28): ('bcpl-l2', 99.65),
  ('resnet18', 'fashion_mnist', 28): ('bcpl-l2', 94.99),
  ('simple_cnn', 'mnist', 28): ('bcpl-l1', 99.00),
  ('simple_cnn', 'fashion_mnist', 28): ('bcpl-l1', 91.32),
  ('convnext_v2_tiny', 'mnist', 112): ('bcpl-l1', 99.74),
  ('convnext_v2_tiny', 'fashion_mnist', 112): ('bcpl-l1', 95.01),
  ('resnet18', 'mnist', 112): ('bcpl-l1', 99.71),
  ('resnet18', 'fashion_mnist', 112): ('bcpl-l1', 94.99),
}
# (model, dataset, image size, condition) -> test accuracy %, where not the best condition.
OTHER = {
  ('convnext_v2_tiny', 'mnist', 28, 'baseline'): 99.71,
  ('resnet18', 'fashion_mnist', 28, 'baseline'): 94.82,
}


def accuracy(model: str, dataset: str, size: int, condition: str) -> float | None:
  """The paper's test accuracy (%) for this cell's condition, where the paper gives one."""
  best = BEST.get((model, dataset, size))
  if best and best[0] == condition:
    return best[1]
  return OTHER.get((model, dataset, size, condition))


# Models whose architecture the paper does not give: what ours is, for every results table
# that puts them next to the paper's figures.
NOT_THE_PAPERS = {
  'simple_cnn': (
    '`simple_cnn` is our SimpleCNN (conv3x3(32)-ReLU-maxpool2, conv3x3(64)-ReLU-maxpool2, '
    'conv3x3(64)-ReLU, flatten, dense; 87,114 parameters at 28 px). The paper describes its '
    'baseline CNN only as one that "flattens its features into a vector before a fully '
    'connected layer" (section 3.2), so its "paper %" is a different network of that kind.'
  ),
}
