"""SimpleCNN trained with the Batch-CAM Prototype Loss, BCPL (Batch-CAM paper, eq. 12).

Features and gradients of the CAM layer are averaged per class over the (global) batch,
their Grad-CAM is compared with the class prototype by `loss.metric` (l1 | l2 | ssim):
L = lambda_class * CE + lambda_cam * sum_{c in batch} phi(M_c, P_c).

Run:
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/simple_cnn_bcpl.py --workdir=runs/simple_cnn_bcpl_l1 [--config.loss.metric=l2]

Expected: test accuracy within a few tenths of configs/simple_cnn_baseline.py, with a much lower
test Batch-CAM loss (results.json) than the baseline.
"""
from configs import simple_cnn_baseline


def get_config():
  config = simple_cnn_baseline.get_config()
  config.loss.kind = 'bcpl'
  config.loss.metric = 'l1'
  config.loss.lambda_cam = 1.0
  return config
