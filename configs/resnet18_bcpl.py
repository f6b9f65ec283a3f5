"""ResNet18 trained with the Batch-CAM Prototype Loss, BCPL (Batch-CAM paper, eq. 12).

Features and gradients of the CAM layer are averaged per class over the (global) batch,
their Grad-CAM is compared with the class prototype by `loss.metric` (l1 | l2 | ssim):
L = lambda_class * CE + lambda_cam * sum_{c in batch} phi(M_c, P_c).

Run:
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/resnet18_bcpl.py --workdir=runs/resnet18_bcpl_l1 [--config.loss.metric=l2]

Expected: test accuracy within a few tenths of configs/resnet18_baseline.py, with a much lower
test Batch-CAM loss (results.json) than the baseline.

lambda_cam = 0.1: see configs/simple_cnn_bcpl.py for the sweep it comes from.
"""

from configs import base, resnet18_baseline


def get_config():
  return base.with_cam_loss(resnet18_baseline.get_config(), 'bcpl')
