"""ConvNeXt-V2-Tiny trained with the per-image Prototype Loss (Batch-CAM paper, eq. 11).

Every image's Grad-CAM (of its label) is upsampled, min-max normalised and compared with
its class prototype by `loss.metric` (l1 | l2 | ssim):
L = lambda_class * CE + lambda_cam * mean_i phi(M_i, P_{y_i}).

Run:
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/convnext_v2_tiny_proto.py --workdir=runs/convnext_v2_tiny_proto_l1 \
      [--config.loss.metric=ssim]

Expected: test accuracy within a few tenths of configs/convnext_v2_tiny_baseline.py, with a lower
test
prototype loss (results.json) than the baseline. lambda_cam = 1: see DEFAULT_LAMBDA_CAM in
configs/base.py.
"""

from configs import base, convnext_v2_tiny_baseline


def get_config():
  return base.with_cam_loss(convnext_v2_tiny_baseline.get_config(), 'proto')
