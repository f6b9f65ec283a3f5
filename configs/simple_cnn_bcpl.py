"""SimpleCNN trained with the Batch-CAM Prototype Loss, BCPL (Batch-CAM paper, eq. 12).

Features and gradients of the CAM layer are averaged per class over the (global) batch,
their Grad-CAM is compared with the class prototype by `loss.metric` (l1 | l2 | ssim):
L = lambda_class * CE + lambda_cam * sum_{c in batch} phi(M_c, P_c).

Run:
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/simple_cnn_bcpl.py --workdir=runs/simple_cnn_bcpl_l1 \
      [--config.loss.metric=l2]

Expected: test accuracy within a few tenths of configs/simple_cnn_baseline.py, with a much lower
test Batch-CAM loss (results.json) than the baseline.

lambda_cam = 0.1 (lambda_class = 1) comes from `bench/lambda_sweep.py` on SimpleCNN, MNIST,
2 epochs, L1: lambda_cam 0.1 / 1 / 10 gave 99.34 / 99.15 / 98.08% test accuracy (baseline
99.24%) and test Batch-CAM loss 0.45 / 0.51 / 0.44 (baseline 2.25). 0.1 keeps the accuracy
and cuts the misalignment five-fold; 10 costs a point of accuracy. The term sums over the
classes of the batch, so 0.1 weighs each class's map about as much as lambda_cam = 1 weighs
the per-image Prototype Loss (a mean over images).
"""

from configs import base, simple_cnn_baseline


def get_config():
  return base.with_cam_loss(simple_cnn_baseline.get_config(), 'bcpl')
