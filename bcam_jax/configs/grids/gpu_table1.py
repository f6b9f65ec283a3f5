"""Three cells of the Batch-CAM paper's Table 1 that a CPU cannot reach, for one GPU run.

  python reproduce.py --grid=configs/grids/gpu_table1.py
  python reproduce.py --grid=configs/grids/gpu_table1.py:resnet18_baseline   # one cell
  python reproduce.py --grid=configs/grids/gpu_table1.py:epochs=1            # a dry run

ResNet18 (small-image stem) baseline and BCPL-L2 on Fashion-MNIST (paper: 94.82 / 94.99),
and ConvNeXt-V2-Tiny (stem stride 1) BCPL-L1 on MNIST (paper: 99.72), at 28x28, seed 0,
with paper_table1's epochs (ResNet18 15, ConvNeXt 20) and its Grad-CAM evaluation. The
optional argument, `[<cell>[+<cell>...]][,epochs=N]`, names cells, so that the three can
train as three processes sharing one GPU (bench/gpu/run.sh does this; every cell writes
into the same grid folder, and a command naming the finished cells then skips their
training and writes their results.md and figures), and `epochs=N` replaces every cell's
epochs (the CPU dry run of that script).
Expected: each cell within a few tenths of a percent of the paper's figure.
"""

import ml_collections

CELLS = {
  'resnet18_baseline': dict(models=('resnet18',), conditions=('baseline',), epochs=15),
  'resnet18_bcpl_l2': dict(models=('resnet18',), conditions=('bcpl-l2',), epochs=15),
  'convnext_bcpl_l1': dict(
    models=('convnext_v2_tiny',), conditions=('bcpl-l1',), datasets=('mnist',), epochs=20
  ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  cells, epochs = set(), None
  for part in filter(None, (arg or '').split(',')):
    if part.startswith('epochs='):
      epochs = int(part.removeprefix('epochs='))
      continue
    for name in part.split('+'):
      if name not in CELLS:
        raise ValueError(
          f'gpu_table1: unknown cell {name!r}; choose one of {tuple(CELLS)} (several joined '
          'by +), or epochs=N.'
        )
      cells.add(name)
  config = ml_collections.ConfigDict()
  config.name = 'gpu_table1'
  config.description = (
    "Three Table 1 cells of the Batch-CAM paper at the paper grid's epochs: ResNet18 "
    'baseline and BCPL-L2 on Fashion-MNIST, ConvNeXt-V2-Tiny BCPL-L1 on MNIST.'
  )
  common = dict(datasets=('fashion_mnist',), image_sizes=(28,), seeds=(0,))
  config.blocks = [
    dict(common, **block) | ({'epochs': epochs} if epochs else {})
    for name, block in CELLS.items()
    if not cells or name in cells
  ]
  config.overrides = ()
  # Insertion/deletion by CA-Stream's convention (eval_options.EvalOptions' defaults).
  config.eval = ml_collections.ConfigDict(dict(num_images=2000))
  return config
