"""PyTorch twins of bcam_jax's models and train step, for bench/cpu_vs_torch.py only.

Same layers, widths, strides, paddings, normalisations and heads as `bcam_jax.models`
(SimpleCNN, ResNet18 with either stem, ConvNeXt-V2-Tiny with the 3x3 stride-1 stem), the
same loss (cross-entropy, plus for `bcpl` the Batch-CAM Prototype Loss with an L1 map
distance computed through the head's gradients with `create_graph=True`) and the same
optimiser (SGD, Nesterov momentum 0.9, weight decay 5e-4). PyTorch is a bench-only
dependency (bench/requirements.txt).
"""

import torch
import torch.nn.functional as F
from torch import nn


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


MODELS = {
  'simple_cnn': SimpleCNN,
  'resnet18': lambda: ResNet18(stem='small'),
  'resnet18_imagenet_stem': lambda: ResNet18(stem='imagenet'),
  'convnext_v2_tiny': ConvNeXtV2Tiny,
  'convnext_v2_tiny_patchify': lambda: ConvNeXtV2Tiny(stem_stride=4),
}


def batch_cam_l1(features, labels, prototypes, head, num_classes):
  """Batch-CAM Prototype Loss with L1: class-mean Grad-CAM of the label vs the prototypes."""
  logits = head(features)
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
      features = backbone(x)
      if kind == 'bcpl':
        cam_term, logits = batch_cam_l1(features, labels, prototypes, model.head, num_classes)
        loss = F.cross_entropy(logits, labels) + lambda_cam * cam_term
      else:
        loss = F.cross_entropy(model.head(features), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step
