"""The Batch-CAM paper's Table 1 grid: 3 models x 7 conditions x 2 datasets at 28x28, 3 seeds.

  python reproduce.py --grid=configs/grids/paper_table1.py

126 cells, and 18 of the ablation: BCPL-L1 with Grad-CAM's gradient G held constant in the
loss (config.loss.cam_gradient='through_features', condition `bcpl-l1-through_features`),
every model, both datasets, 3 seeds. Epochs: SimpleCNN 15, ResNet18 (small-image stem) 15,
ConvNeXt-V2-Tiny (stem stride 1) 20. Needs a GPU: on the 2-core CPU a ResNet18 epoch takes
about 15 min and a ConvNeXt epoch over an hour. Expected (targets): at least the paper's
Table 1 on every cell it reports (ConvNeXt-V2-T 99.72 / 94.79, ResNet18 99.65 / 94.99,
SimpleCNN 99.00 / 91.32 on MNIST / Fashion-MNIST), and BCPL within one seed std of the
baseline.
"""

import ml_collections

from bcam_jax import conditions


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = 'paper_table1'
  config.description = (
    'Table 1 of the Batch-CAM paper: every model under all seven '
    'training conditions on MNIST and Fashion-MNIST at 28x28, and BCPL-L1 '
    'trained through the features alone (G constant, the ablation).'
  )
  common = dict(
    conditions=tuple(conditions.CONDITIONS),
    datasets=('mnist', 'fashion_mnist'),
    image_sizes=(28,),
    seeds=(0, 1, 2),
  )
  epochs = {'simple_cnn': 15, 'resnet18': 15, 'convnext_v2_tiny': 20}
  config.blocks = [dict(common, models=(m,), epochs=e) for m, e in epochs.items()] + [
    dict(common, models=(m,), conditions=('bcpl-l1-through_features',), epochs=e)
    for m, e in epochs.items()
  ]
  config.overrides = ()
  # Insertion/deletion by CA-Stream's convention (eval_options.EvalOptions' defaults).
  config.eval = ml_collections.ConfigDict(dict(num_images=2000))
  return config
