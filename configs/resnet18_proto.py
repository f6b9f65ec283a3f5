"""ResNet18 trained with the per-image Prototype Loss (Batch-CAM paper, eq. 11).

Every image's Grad-CAM (of its label) is upsampled, min-max normalised and compared with
its class prototype by `loss.metric` (l1 | l2 | ssim):
L = lambda_class * CE + lambda_cam * mean_i phi(M_i, P_{y_i}).

Run:
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/resnet18_proto.py --workdir=runs/resnet18_proto_l1 \
      [--config.loss.metric=ssim]

Expected: test accuracy within a few tenths of configs/resnet18_baseline.py, with a lower test
prototype loss (results.json) than the baseline. lambda_cam = 1: see DEFAULT_LAMBDA_CAM in
configs/base.py.
"""

from configs import base, resnet18_baseline


def get_config():
  return base.with_cam_loss(resnet18_baseline.get_config(), 'proto')
