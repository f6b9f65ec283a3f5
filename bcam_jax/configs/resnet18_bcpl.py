"""ResNet18 trained with the Batch-CAM Prototype Loss, BCPL (Batch-CAM paper, eq. 12).

The experiment config `configs/experiment.py:model=resnet18,loss=bcpl` under its own name.
Features and gradients of the CAM layer are averaged per class over the (global) batch,
their Grad-CAM is compared with the class prototype by `loss.metric` (l1 | l2 | ssim):
L = lambda_class * CE + lambda_cam * sum_{c in batch} phi(M_c, P_c).

Run:
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/resnet18_bcpl.py --workdir=runs/resnet18_bcpl_l1 [--config.loss.metric=l2]

Expected: test accuracy within a few tenths of the ResNet18 baseline
(`configs/experiment.py:model=resnet18`), with a much lower test Batch-CAM loss
(results.json).
"""

from bcam_jax.configs import experiment


def get_config():
  return experiment.get_config('model=resnet18,loss=bcpl')
