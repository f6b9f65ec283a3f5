"""SimpleCNN with CA-Stream: attention pooling by a CLS query crossing every stage.

A learnable query q_0 attends over the positions of each stage's features F (a = softmax(F q /
sqrt(d)), pooled F^T a, then a linear map to the next stage's width); at the CAM layer the
pooled feature replaces global average pooling before the classifier, and a is the
class-agnostic explanation (`eval.py --methods=raw_attention`). Grad-CAM, Grad-CAM++ and
Score-CAM explain the model through its new head as before.

SimpleCNN flattens its CAM map instead of pooling it, so its CA-Stream classifier (pooled
64-d features -> dense) is new and trains with everything else: freeze_backbone is for the
global-average-pool backbones (resnet18, convnext_v2_tiny).

Run (everything trained; for resnet18 and convnext also the frozen protocol):
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/simple_cnn_castream.py --workdir=runs/simple_cnn_castream

Expected: test accuracy within a few tenths of configs/simple_cnn_baseline.py.
"""

from configs import simple_cnn_baseline


def get_config():
  config = simple_cnn_baseline.get_config()
  config.model.pooling = 'ca_stream'
  return config
