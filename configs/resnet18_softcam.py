"""ResNet18 with the Soft-CAM head: a 1x1 conv class-evidence layer replaces the classifier.

The evidence maps E (N, h, w, C) of the CAM layer are averaged into the logits, and E of the
target class is the explanation, computed in the forward pass (`eval.py --methods=evidence`).
Loss: CE + lambda_l1 * mean|E| + lambda_l2 * mean(E^2) (ElasticNet; dense: both 0).

Run (dense; sparse: --config.loss.lambda_l1=0.01; ridge: --config.loss.lambda_l2=0.01):
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/resnet18_softcam.py --workdir=runs/resnet18_softcam_dense

Expected: test accuracy within a few tenths of configs/resnet18_baseline.py. Soft-CAM combines
with the Batch-CAM losses (`--config.loss.kind=bcpl --config.loss.lambda_cam=0.1`), the label's
evidence map taking Grad-CAM's place.
"""

from configs import resnet18_baseline


def get_config():
  config = resnet18_baseline.get_config()
  config.model.head = 'softcam'
  return config
