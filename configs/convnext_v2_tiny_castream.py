"""ConvNeXt-V2-Tiny with CA-Stream: attention pooling by a CLS query crossing every stage.

A learnable query q_0 attends over the positions of each stage's features F (a = softmax(F q /
sqrt(d)), pooled F^T a, then a linear map to the next stage's width); at the CAM layer the
pooled feature replaces global average pooling before the classifier, and a is the
class-agnostic explanation (`eval.py --methods=raw_attention`). Grad-CAM, Grad-CAM++ and
Score-CAM explain the model through its new head as before.

The paper's protocol trains only the stream on a frozen, trained baseline:
  --config.model.ca_stream.freeze_backbone=True --config.init_from=runs/convnext_v2_tiny_mnist
(backbone, classifier and BatchNorm statistics restored from that run's best checkpoint).

Run (everything trained; for resnet18 and convnext also the frozen protocol):
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/convnext_v2_tiny_castream.py --workdir=runs/convnext_v2_tiny_castream
  BCAM_DATA_DIR=../shared/data python train.py \
      --config=configs/convnext_v2_tiny_castream.py \
      --workdir=runs/convnext_v2_tiny_castream_frozen \
      --config.model.ca_stream.freeze_backbone=True --config.init_from=runs/convnext_v2_tiny_mnist

Expected: test accuracy within a few tenths of configs/convnext_v2_tiny_baseline.py.
"""

from configs import convnext_v2_tiny_baseline


def get_config():
  config = convnext_v2_tiny_baseline.get_config()
  config.model.pooling = 'ca_stream'
  return config
