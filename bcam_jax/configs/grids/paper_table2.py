"""The Batch-CAM paper's Table 2 grid: ResNet18 and ConvNeXt-V2-Tiny at 112x112, best conditions.

  python reproduce.py --grid=configs/grids/paper_table2.py

Baseline, BCPL-L1 (the paper's best at 112 for both models and datasets) and BCPL-L2 on
MNIST and Fashion-MNIST, 3 seeds, 10 epochs. 36 cells; needs a GPU.

Both models are the networks of Table 1 (the same stems as at 28 px), retrained at 112 as
the paper's section 3.5 does to get higher-resolution Grad-CAMs: 14x14 CAM maps for
ConvNeXt-V2-T (stem_stride 1, against 3x3 at 28) and for ResNet18 (small stem, against 4x4).
The paper's 28 px ConvNeXt has 3x3 maps, so its network has stride 8 before the last stage;
the same network at 112 gives 14x14. ConvNeXt with stem_stride 1 at 112 costs about four
times its ImageNet FLOPs: the patchify stem (stem_stride 4, 3x3 maps at 112, the resolution
of 28 px) is the cheaper option:

  python reproduce.py --grid=configs/grids/paper_table2.py:patchify

Expected (targets): ConvNeXt-V2-T 99.74 / 95.01 and ResNet18 99.71 / 94.99 on MNIST /
Fashion-MNIST with BCPL-L1, with class-mean Grad-CAMs that draw the digit or garment.
"""

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """`arg`: '' (the networks of Table 1) or 'patchify' (ConvNeXt with its ImageNet stem)."""
  if arg not in ('', 'patchify'):
    raise ValueError(f"paper_table2 takes '' or 'patchify' after the colon, got {arg!r}")
  config = ml_collections.ConfigDict()
  config.name = 'paper_table2' + ('_patchify' if arg else '')
  config.command = 'python reproduce.py --grid=configs/grids/paper_table2.py' + (
    ':' + arg if arg else ''
  )
  config.description = (
    'Table 2 of the Batch-CAM paper: the deep models retrained at '
    '112x112 under the baseline and the best BCPL conditions.'
  )
  common = dict(
    conditions=('baseline', 'bcpl-l1', 'bcpl-l2'),
    datasets=('mnist', 'fashion_mnist'),
    image_sizes=(112,),
    seeds=(0, 1, 2),
    epochs=10,
  )
  config.blocks = [
    dict(common, models=('resnet18',)),
    dict(
      common,
      models=('convnext_v2_tiny',),
      overrides=(('model.options.stem_stride', 4 if arg == 'patchify' else 1),),
    ),
  ]
  config.overrides = ()
  # Insertion/deletion by CA-Stream's convention (eval_options.EvalOptions' defaults).
  config.eval = ml_collections.ConfigDict(dict(num_images=2000))
  return config
