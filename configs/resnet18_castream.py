"""ResNet18 with CA-Stream: attention pooling by a CLS query crossing every stage.

A learnable query q_0 attends over the positions of each stage's features F (a = softmax(F q /
sqrt(d)), pooled F^T a, then a linear map to the next stage's width); at the CAM layer the
pooled feature replaces global average pooling before the classifier, and a is the
class-agnostic explanation (`eval.py --methods=raw_attention`). Grad-CAM, Grad-CAM++ and
Score-CAM explain the model through its new head as before.

The paper's protocol trains only the stream on a frozen, trained baseline:
  --config.model.ca_stream.freeze_backbone=True --config.init_from=runs/resnet18_mnist
(backbone, classifier and BatchNorm statistics restored from that run's best checkpoint).

Run (everything trained; for resnet18 and convnext also the frozen protocol):
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/resnet18_castream.py --workdir=runs/resnet18_castream
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/resnet18_castream.py --workdir=runs/resnet18_castream_frozen \
      --config.model.ca_stream.freeze_backbone=True --config.init_from=runs/resnet18_mnist

Expected: test accuracy within a few tenths of configs/resnet18_baseline.py.
"""

from configs import resnet18_baseline


def get_config():
  config = resnet18_baseline.get_config()
  config.model.pooling = 'ca_stream'
  return config
