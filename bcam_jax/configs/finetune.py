"""Fine-tuning published ImageNet weights on an image folder at 224 px, through the explanations.

The argument picks the protocol (default `bcpl`):
  bcpl       every layer trains with cross-entropy plus the Batch-CAM Prototype Loss (L1,
             lambda 0.1): the network is fine-tuned to explain like the class prototypes
  ca_stream  CA-Stream's protocol: the pretrained backbone frozen (evaluation mode, no
             gradient), its attention stream and a new classifier trained with
             cross-entropy (the paper trains the stream on a frozen ResNet-50 at 224 px)
  softcam    Soft-CAM's protocol: the classifier replaced by the class-evidence head (a 1x1
             conv of the CAM layer, its mean the logits), the whole network fine-tuned; add
             --config.loss.lambda_l1=2e-5 or lambda_l2 for the paper's sparse or ridge form
The model is ResNet-50 (torchvision's layout); any model with published weights works:
--config.model.name=resnet18|resnet34|resnet101|convnext_tiny|vit_s16|vit_b16 with its file.

The weights: config.init.pretrained is a torchvision / timm state_dict (.pth/.pt with torch
installed, or .safetensors without) or a `bcam-weights convert` directory; the backbone comes
from it and the classifier starts fresh for the folder's classes. Images are normalised with
ImageNet's mean and std (config.data.normalization='auto'); a grey folder (data.channels=1)
is seen through the first conv summed over RGB.

Run:
  python train.py --config=configs/finetune.py:bcpl --workdir=runs/finetune_bcpl \
      --config.data.folder_dir=/path/to/root --config.init.pretrained=resnet50.pth
  python eval.py --config=configs/finetune.py:bcpl --workdir=runs/finetune_bcpl \
      --config.data.folder_dir=/path/to/root --config.init.pretrained=resnet50.pth
  (ca_stream: eval.py --config.eval.methods=raw_attention,grad_cam; softcam: evidence,grad_cam)

Expected: from ImageNet weights, a folder of natural images well above chance within one or
two epochs (test accuracy in results.json), the Batch-CAM loss falling under bcpl; eval.py
writes the prototypes beside each class's mean explanation to <workdir>/eval/. Without
config.init.pretrained, bcpl and softcam train from random weights (and ca_stream refuses:
it has nothing to freeze). On the project's 2-core CPU a ResNet-50 step at 224 px, batch 32,
takes seconds (bench/README.md, Fine-tuning at 224 px); use a GPU.
"""

import ml_collections

from bcam_jax import conditions
from bcam_jax.configs import base

PROTOCOLS = ('bcpl', 'ca_stream', 'softcam')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ResNet-50 at 224 px on an image folder under `arg`'s protocol (`PROTOCOLS`)."""
  protocol = arg or 'bcpl'
  if protocol not in PROTOCOLS:
    raise ValueError(
      f'configs/finetune.py: {protocol!r} is not a protocol; choose one of {PROTOCOLS}.'
    )
  config = base.get_base_config()
  config.model.name = 'resnet50'
  config.model.options.stem = 'imagenet'
  config.init.pretrained = ''  # required: --config.init.pretrained=<weights>
  config.data.source = 'folder'
  config.data.name = 'image_folder'
  config.data.folder_dir = ''  # required: --config.data.folder_dir=<root>
  config.data.image_size = 224
  config.data.val_size = 500  # used only when the folder has no val split
  config.train.batch_size = 64
  config.train.num_epochs = 10
  config.eval.batch_size = 100
  # Fine-tuning: a tenth of training from scratch's rate, torchvision's weight decay.
  config.optimizer.learning_rate = 0.01
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 100
  loss = 'bcpl' if protocol == 'bcpl' else 'ce'
  conditions.apply(config, conditions.Condition(loss, 'l1'))
  if protocol == 'ca_stream':
    config.model.pooling = 'ca_stream'
    config.init.freeze_backbone = True
  elif protocol == 'softcam':
    config.model.head = 'softcam'
  return config
