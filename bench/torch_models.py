"""PyTorch twins of bcam_jax's models and train step, for bench/cpu_vs_torch.py and gpu/speed.py.

Same layers, widths, strides, paddings, normalisations and heads as `bcam_jax.models`
(SimpleCNN, ResNet18 with either stem, ConvNeXt-V2-Tiny with the 3x3 stride-1 stem or the 4x4
patchify stem, ResNet-50 with the ImageNet stem from torchvision, ViT-S/16 from timm), the
same loss (cross-entropy, plus for `bcpl` the Batch-CAM Prototype Loss with an L1 map
distance computed through the head's gradients with `create_graph=True`) and the same
optimiser (SGD, Nesterov momentum 0.9, weight decay 5e-4). PyTorch is a bench-only
dependency (bench/requirements.txt); torchvision and timm are imported only by the twins that
need them.

A twin has `backbone(x)` -> the CAM layer (NCHW), or a tuple (CAM layer, *context) where the
head needs more than the CAM layer (the ViT's class token), and `head(cam, *context)` ->
logits; Grad-CAM differentiates with respect to the CAM layer only.
"""

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class SimpleCNN(nn.Module):
  def __init__(self, num_classes=10, image_size=28):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
    self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
    self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
    side = image_size // 4
    self.dense = nn.Linear(64 * side * side, num_classes)

  def backbone(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    return F.relu(self.conv3(x))

  def head(self, cam):
    return self.dense(cam.flatten(1))


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet18(nn.Module):
  def __init__(self, num_classes=10, stem='small'):
    super().__init__()
    if stem == 'small':
      self.stem = nn.Sequential(
        nn.Conv2d(1, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
      )
    else:
      self.stem = nn.Sequential(
        nn.Conv2d(1, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
      )
    blocks, cin = [], 64
    for width, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
      blocks += [BasicBlock(cin, width, stride), BasicBlock(width, width, 1)]
      cin = width
    self.blocks = nn.Sequential(*blocks)
    self.dense = nn.Linear(512, num_classes)

  def backbone(self, x):
    return self.blocks(self.stem(x))

  def head(self, cam):
    return self.dense(cam.mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
  """LayerNorm over the channels of an NCHW map."""

  def forward(self, x):
    return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
  """Global Response Normalisation on NHWC, as ConvNeXt V2's reference code."""

  def __init__(self, dim):
    super().__init__()
    self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
    self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

  def forward(self, x):
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    return self.gamma * (x * nx) + self.beta + x


class ConvNeXtBlock(nn.Module):
  def __init__(self, dim, drop_path):
    super().__init__()
    self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.pwconv1 = nn.Linear(dim, 4 * dim)
    self.grn = GRN(4 * dim)
    self.pwconv2 = nn.Linear(4 * dim, dim)
    self.drop_path = drop_path

  def forward(self, x):
    y = self.dwconv(x).permute(0, 2, 3, 1)
    y = self.pwconv2(self.grn(F.gelu(self.pwconv1(self.norm(y))))).permute(0, 3, 1, 2)
    if self.training and self.drop_path > 0:
      keep = 1.0 - self.drop_path
      y = y * torch.bernoulli(y.new_full((y.shape[0], 1, 1, 1), keep)) / keep
    return x + y


class ConvNeXtV2Tiny(nn.Module):
  def __init__(self, num_classes=10, drop_path_rate=0.1, stem_stride=1):
    super().__init__()
    dims, depths = (96, 192, 384, 768), (3, 3, 9, 3)
    rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
    stem = nn.Conv2d(1, dims[0], 4, 4) if stem_stride == 4 else nn.Conv2d(1, dims[0], 3, 1, 1)
    layers = [stem, LayerNorm2d(dims[0], eps=1e-6)]
    for i, (dim, depth) in enumerate(zip(dims, depths)):
      if i:
        layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2)]
      layers += [ConvNeXtBlock(dim, rates.pop(0)) for _ in range(depth)]
    self.layers = nn.Sequential(*layers)
    self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
    self.dense = nn.Linear(dims[-1], num_classes)

  def backbone(self, x):
    return self.layers(x)

  def head(self, cam):
    return self.dense(self.norm(cam.mean((2, 3))))


class ResNet50(nn.Module):
  """torchvision's ResNet-50 (v1.5: stride on the 3x3) with a 1-channel 7x7/2 stem conv, as
  `get_model('resnet50', n, stem='imagenet')`; the CAM layer is layer4's output (our stage4)."""

  def __init__(self, num_classes=10):
    super().__init__()
    import torchvision  # pylint: disable=import-outside-toplevel

    self.net = torchvision.models.resnet50(num_classes=num_classes)
    self.net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(self.net.conv1.weight, mode='fan_out', nonlinearity='relu')

  def backbone(self, x):
    n = self.net
    x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
    return n.layer4(n.layer3(n.layer2(n.layer1(x))))

  def head(self, cam):
    return self.net.fc(cam.mean((2, 3)))


class ViTS16(nn.Module):
  """timm's ViT-S/16 (hidden 384, depth 12, 6 heads, MLP 1536) for 1-channel images of side
  `image_size`, as `get_model('vit_s16', n)` initialised at that size.

  As ours (bcam_jax/models/vit.py), the CAM layer is the patch grid entering the last block,
  and the head is the last block, the final norm and the classifier on the class token, with
  the class token at that point as its second input. Like ours, the head computes in float32
  (autocast off inside it).
  """

  def __init__(self, num_classes=10, image_size=224):
    super().__init__()
    from timm.models.vision_transformer import (  # pylint: disable=import-outside-toplevel
      VisionTransformer,
    )

    self.vit = VisionTransformer(
      img_size=image_size,
      patch_size=16,
      in_chans=1,
      num_classes=num_classes,
      embed_dim=384,
      depth=12,
      num_heads=6,
    )

  def backbone(self, x):
    """Images -> (patch grid (N, 384, s, s) entering the last block, class token (N, 384))."""
    v = self.vit
    tokens = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
    tokens = v.blocks[:-1](tokens)
    n, length, d = tokens.shape
    side = int(round((length - 1) ** 0.5))
    grid = tokens[:, 1:].transpose(1, 2).reshape(n, d, side, side)
    return grid, tokens[:, 0]

  def head(self, cam, class_token):
    v = self.vit
    with torch.autocast(cam.device.type, enabled=False):
      cam, class_token = cam.float(), class_token.float()
      tokens = torch.cat([class_token[:, None], cam.flatten(2).transpose(1, 2)], dim=1)
      tokens = v.norm(v.blocks[-1](tokens))
      return v.head(tokens[:, 0])


MODELS = {
  'simple_cnn': SimpleCNN,
  'resnet18': lambda: ResNet18(stem='small'),
  'resnet18_imagenet_stem': lambda: ResNet18(stem='imagenet'),
  'convnext_v2_tiny': ConvNeXtV2Tiny,
  'convnext_v2_tiny_patchify': lambda: ConvNeXtV2Tiny(stem_stride=4),
  'resnet50': ResNet50,
  'vit_s16': ViTS16,
}


def build(name, image_size):
  """The twin `name` of MODELS for images of side `image_size` (passed to the twins whose
  layers depend on it: SimpleCNN's dense layer, the ViT's position embedding)."""
  factory = MODELS[name]
  if 'image_size' in inspect.signature(factory).parameters:
    return factory(image_size=image_size)
  return factory()


def _split(out):
  """A backbone's output as (CAM layer, context tuple for the head)."""
  if isinstance(out, tuple):
    return out[0], tuple(out[1:])
  return out, ()


def batch_cam_l1(features, labels, prototypes, head, num_classes, context=()):
  """Batch-CAM Prototype Loss with L1: class-mean Grad-CAM of the label vs the prototypes.

  `head(features, *context)` gives the logits; the gradient is taken w.r.t. `features` only.
  The head runs with scaled_dot_product_attention's math backend: the fused attention kernels
  have no double backward, which the loss's gradient needs (a no-op for the conv twins).
  """
  with sdpa_kernel(SDPBackend.MATH):
    logits = head(features, *context)
  scores = logits.gather(1, labels[:, None]).sum()
  (grads,) = torch.autograd.grad(scores, features, create_graph=True)
  ones = torch.ones(labels.shape, device=labels.device)
  counts = torch.zeros(num_classes, device=labels.device).index_add_(0, labels, ones)
  scale = (1.0 / counts.clamp(min=1.0))[:, None, None, None]
  mean_a = features.new_zeros((num_classes,) + features.shape[1:]).index_add(0, labels, features)
  mean_g = grads.new_zeros((num_classes,) + grads.shape[1:]).index_add(0, labels, grads)
  mean_a, mean_g = mean_a * scale, mean_g * scale
  alpha = mean_g.mean((2, 3), keepdim=True)
  maps = F.relu((alpha * mean_a).sum(1, keepdim=True))
  maps = F.interpolate(maps, size=prototypes.shape[-2:], mode='bilinear', align_corners=False)
  low = maps.amin((2, 3), keepdim=True)
  high = maps.amax((2, 3), keepdim=True)
  maps = ((maps - low) / (high - low).clamp(min=1e-8))[:, 0]
  distance = (maps - prototypes).abs().mean((1, 2))
  return ((counts > 0).float() * distance).sum(), logits


def make_train_step(
  model,
  kind,
  mean,
  std,
  lambda_cam=0.1,
  num_classes=10,
  autocast=None,
  compile_backbone=False,
  channels_last=False,
):
  """(uint8 images NHWC, int64 labels, prototypes) -> loss; one SGD step, as bcam_jax's.

  On whatever device the model and the inputs are. `autocast` (e.g. torch.bfloat16) runs the
  forward pass and the loss under `torch.autocast`, PyTorch's mixed precision, with float32
  parameters as ours; `compile_backbone` puts the backbone through `torch.compile` (the head
  stays eager: BCPL differentiates the head's gradient, which compiled graphs do not);
  `channels_last` keeps the weights and activations NHWC in memory (PyTorch's faster
  layout for cuDNN convolutions with tensor cores).
  """
  if channels_last:
    model.to(memory_format=torch.channels_last)
  decay = [p for n, p in model.named_parameters() if p.ndim > 1]
  no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
  optimizer = torch.optim.SGD(
    [{'params': decay, 'weight_decay': 5e-4}, {'params': no_decay, 'weight_decay': 0.0}],
    lr=0.05,
    momentum=0.9,
    nesterov=True,
  )
  model.train()
  backbone = torch.compile(model.backbone) if compile_backbone else model.backbone
  device_type = next(model.parameters()).device.type

  def step(images, labels, prototypes):
    with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
      x = (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
      if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
      features, context = _split(backbone(x))
      if kind == 'bcpl':
        cam_term, logits = batch_cam_l1(
          features, labels, prototypes, model.head, num_classes, context
        )
        loss = F.cross_entropy(logits, labels) + lambda_cam * cam_term
      else:
        loss = F.cross_entropy(model.head(features, *context), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step
