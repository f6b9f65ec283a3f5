"""Published weights (PyTorch state_dicts) as our models' variables, and their Orbax copies.

``load_pretrained(name, path)`` reads a state_dict saved by ``torch.save`` (``.pth``, ``.pt``;
needs torch) or a ``.safetensors`` file (needs only safetensors), with the names of
torchvision's ResNets (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0/1``, ``fc``),
timm's ViTs (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.attn.qkv``, ...,
``norm``, ``head``) and timm's ConvNeXt (``stem.0``, ``stages.N.downsample``,
``stages.N.blocks.M.conv_dw/norm/mlp.fc1/mlp.fc2/gamma``, ``head.norm``, ``head.fc``; or
torchvision's ``features.*``/``classifier.*``). It builds the model those weights fit (the
ImageNet stem; width, channels, ViT depth, MLP width, patch and image size read from the
file; ViT heads = hidden / 64, as in every published ViT) and places each tensor: conv
kernels OIHW -> HWIO, linear weights (out, in) -> (in, out), BatchNorm running statistics
into ``batch_stats`` (``num_batches_tracked`` is ignored). Every parameter must come from the
file and every tensor of the file must be used: a missing, extra or misshapen key is a
``WeightsError`` (a ValueError) naming it with the shapes found and expected.

``save_converted`` writes the variables as an Orbax checkpoint beside a ``model.json`` (name,
num_classes, options, image size, channels), atomically, and ``load_converted`` reads them
back without torch: what ``bcam-weights convert`` makes for training to start from.
"""

import json
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from bcam_jax import models

RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101')
VITS = ('vit_s16', 'vit_b16')
CONVNEXTS = ('convnext_tiny',)
PRETRAINED_NAMES = RESNETS + VITS + CONVNEXTS
VIT_HEAD_DIM = 64
VARIABLES_DIR = 'variables'
MODEL_JSON = 'model.json'


class WeightsError(ValueError):
  """A weights file that cannot be read, or does not fit the model."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a state_dict file (``.pth``/``.pt`` by torch, ``.safetensors``) as numpy
  arrays by name."""
  if not os.path.isfile(path):
    raise WeightsError(f'{path}: no such file')
  if path.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file  # optional: only .safetensors files need it
    except ImportError as error:
      raise WeightsError(f'{path}: reading .safetensors needs pip install safetensors') from error
    return load_file(path)
  if not path.endswith(('.pth', '.pt')):
    raise WeightsError(f'{path}: expected a .pth, .pt or .safetensors file')
  try:
    import torch  # optional: only PyTorch files need it
  except ImportError as error:
    raise WeightsError(
      f'{path}: reading a PyTorch file needs pip install torch; or save the state_dict as '
      '.safetensors (safetensors.torch.save_file) where torch is installed'
    ) from error
  state = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
    raise WeightsError(f'{path}: expected a state_dict (a dict of tensors), got {type(state)}')
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _shape(state, key, path):
  if key not in state:
    raise WeightsError(f'{path}: key {key!r} is missing')
  return tuple(state[key].shape)


# torchvision's ConvNeXt names -> timm's (features.{2k+1}: stage k, features.{2k}: its
# downsampling, for k >= 1).
_TORCHVISION_CONVNEXT = (
  (r'^features\.0\.', 'stem.'),
  (r'^features\.(\d+)\.(\d+)\.block\.0\.', lambda m: f'{_stage(m)}.blocks.{m[2]}.conv_dw.'),
  (r'^features\.(\d+)\.(\d+)\.block\.2\.', lambda m: f'{_stage(m)}.blocks.{m[2]}.norm.'),
  (r'^features\.(\d+)\.(\d+)\.block\.3\.', lambda m: f'{_stage(m)}.blocks.{m[2]}.mlp.fc1.'),
  (r'^features\.(\d+)\.(\d+)\.block\.5\.', lambda m: f'{_stage(m)}.blocks.{m[2]}.mlp.fc2.'),
  (r'^features\.(\d+)\.(\d+)\.layer_scale$', lambda m: f'{_stage(m)}.blocks.{m[2]}.gamma'),
  (r'^features\.(\d+)\.([01])\.', lambda m: f'stages.{int(m[1]) // 2}.downsample.{m[2]}.'),
  (r'^classifier\.0\.', 'head.norm.'),
  (r'^classifier\.2\.', 'head.fc.'),
)


def _stage(match) -> str:
  return f'stages.{(int(match[1]) - 1) // 2}'


def _timm_convnext_names(state: dict) -> dict:
  """A torchvision ConvNeXt state_dict under timm's names (layer scales `(C, 1, 1)` ->
  `(C,)`); any other state_dict as it is."""
  if 'features.0.0.weight' not in state:
    return state
  renamed = {}
  for key, value in state.items():
    new = key
    for pattern, replacement in _TORCHVISION_CONVNEXT:
      new, count = re.subn(pattern, replacement, key)
      if count:
        break
    renamed[new] = value.reshape(-1) if new.endswith('.gamma') else value
  return renamed


def _dec(match, group=1) -> int:
  return int(match[group]) - 1


def _rules(name: str, options: dict):
  """(pattern, replacement) pairs from our module paths ('/'-joined) to the file's."""
  if name in RESNETS:
    return (
      (r'^backbone_net/stem_conv', 'conv1'),
      (r'^backbone_net/stem_bn', 'bn1'),
      (r'^backbone_net/stage(\d+)_block(\d+)', lambda m: f'layer{m[1]}.{_dec(m, 2)}'),
      (r'/proj_conv', '.downsample.0'),
      (r'/proj_bn', '.downsample.1'),
      (r'^head_net/dense', 'fc'),
    )
  if name in VITS:
    return (
      (r'^backbone_net/patch_embed', 'patch_embed.proj'),
      (r'^backbone_net/encoderblock_(\d+)', lambda m: f'blocks.{m[1]}'),
      (r'^backbone_net/', ''),
      (r'^head_net/block', f'blocks.{options["depth"] - 1}'),
      (r'^head_net/norm', 'norm'),
      (r'^head_net/dense', 'head'),
    )
  return (
    (r'^backbone_net/stem_conv', 'stem.0'),
    (r'^backbone_net/stem_norm', 'stem.1'),
    (r'^backbone_net/downsample(\d)_norm', lambda m: f'stages.{_dec(m)}.downsample.0'),
    (r'^backbone_net/downsample(\d)_conv', lambda m: f'stages.{_dec(m)}.downsample.1'),
    (r'^backbone_net/stage(\d)_block(\d+)', lambda m: f'stages.{_dec(m)}.blocks.{_dec(m, 2)}'),
    (r'/dwconv', '.conv_dw'),
    (r'/pwconv1', '.mlp.fc1'),
    (r'/pwconv2', '.mlp.fc2'),
    (r'^head_net/norm', 'head.norm'),
    (r'^head_net/dense', 'head.fc'),
  )


_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}


def _file_key(path: tuple[str, ...], rules) -> str:
  """The state_dict key of our variable at `path` (collection first)."""
  *modules, leaf = path[1:]
  module = '/'.join(modules) + '/'
  for pattern, replacement in rules:
    module = re.sub(pattern, replacement, module)
  return (module.replace('/', '.') + _LEAVES.get(leaf, leaf)).lstrip('.')


def _from_file_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  """Conv kernels OIHW -> HWIO, linear weights (out, in) -> (in, out), the rest as is."""
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array.T if leaf == 'kernel' else array


def _to_file_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  """`_from_file_layout` inverted: our HWIO conv kernels and (in, out) weights as the file's."""
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array.T if leaf == 'kernel' else array


def _file_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """The shape in the file of our variable of `shape`: `_from_file_layout` inverted."""
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if leaf == 'kernel' else tuple(shape)


def _model_from_file(name: str, state: dict, path: str):
  """(options of get_model, channels, image side) that the file's tensors fit."""
  if name in RESNETS:
    width, channels, _, _ = _shape(state, 'conv1.weight', path)
    return {'stem': 'imagenet', 'width': width}, channels, 32
  if name in CONVNEXTS:
    width, channels, _, _ = _shape(state, 'stem.0.weight', path)
    return {'stem_stride': 4, 'width': width}, channels, 32
  hidden, channels, patch, _ = _shape(state, 'patch_embed.proj.weight', path)
  depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
  mlp_dim = _shape(state, 'blocks.0.mlp.fc1.weight', path)[0]
  side = math.isqrt(_shape(state, 'pos_embed', path)[1] - 1)
  options = {
    'patch_size': patch,
    'hidden': hidden,
    'depth': depth,
    'heads': max(1, hidden // VIT_HEAD_DIM),
    'mlp_dim': mlp_dim,
  }
  return options, channels, side * patch


def _classifier_prefix(name: str) -> str:
  return {**dict.fromkeys(RESNETS, 'fc.'), **dict.fromkeys(VITS, 'head.')}.get(name, 'head.fc.')


def _fitting(state: dict, name: str, path: str, num_classes: int | None):
  """(model, variables, image side, channels, options) with the file's tensors placed."""
  options, channels, side = _model_from_file(name, state, path)
  classifier = _classifier_prefix(name)
  file_classes = _shape(state, classifier + 'weight', path)[0]
  model = models.get_model(name, num_classes or file_classes, **options)
  fresh_classifier = num_classes is not None and num_classes != file_classes
  if fresh_classifier:
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    init = models.init_variables(model, jax.random.key(0), side, channels)
  else:
    images = jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32)
    init = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  init = {k: init[k] for k in ('params', 'batch_stats') if k in init}
  rules = _rules(name, options)
  placed, used, problems = {}, set(), []
  for var_path, target in traverse_util.flatten_dict(init).items():
    leaf, key = var_path[-1], _file_key(var_path, rules)
    expected = _file_shape(target.shape, leaf)
    if fresh_classifier and key.startswith(classifier):
      placed[var_path] = target
    elif key not in state:
      problems.append(f'key {key!r} is missing (expected shape {expected})')
    elif tuple(state[key].shape) != expected:
      problems.append(f'key {key!r} has shape {tuple(state[key].shape)}, expected {expected}')
    else:
      placed[var_path] = jnp.asarray(_from_file_layout(np.asarray(state[key]), leaf), jnp.float32)
    used.add(key)
  for key in state:
    if key not in used and not key.endswith('num_batches_tracked'):
      problems.append(f'unexpected key {key!r} of shape {tuple(state[key].shape)}')
  if problems:
    more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
    raise WeightsError(f'{path} does not fit {model.label()}: {problems[0]}{more}')
  return model, traverse_util.unflatten_dict(placed), side, channels, options


def load_pretrained(name: str, path: str, *, num_classes: int | None = None):
  """(model, variables) of model ``name`` (``PRETRAINED_NAMES``) with the weights of the
  state_dict at ``path``, for ``model.apply(variables, images_nhwc, train=False)``.

  ``num_classes`` None keeps the file's classifier; another count starts a fresh classifier
  (the model's own initialisation, key 0) and ignores the file's. WeightsError (a ValueError)
  for an unreadable file or one that does not fit.
  """
  model, variables, _, _, _ = _load(name, path, num_classes)
  return model, variables


def _load(name, path, num_classes):
  return _fitting(_read(name, path), name, path, num_classes)


def _check_name(name: str) -> None:
  if name not in PRETRAINED_NAMES:
    raise WeightsError(
      f'no pretrained weights layout for model {name!r}; valid: {", ".join(PRETRAINED_NAMES)}'
    )


def _read(name: str, path: str) -> dict:
  """The tensors of the weights file at `path` for model `name`, under timm's names."""
  _check_name(name)
  state = read_state_dict(path)
  return _timm_convnext_names(state) if name in CONVNEXTS else state


def convert(name: str, source: str, directory: str, *, num_classes: int | None = None) -> dict:
  """Loads ``source`` as ``load_pretrained`` does and saves it to ``directory`` with
  ``save_converted``; returns the model.json contents."""
  model, variables, side, channels, options = _load(name, source, num_classes)
  info = {
    'name': name,
    'num_classes': model.num_classes,
    'options': options,
    'image_size': side,
    'channels': channels,
  }
  save_converted(directory, variables, info)
  return info


def save_converted(directory: str, variables, info: dict) -> None:
  """Writes ``variables`` as an Orbax checkpoint in ``directory/variables`` and ``info`` as
  ``directory/model.json``, in a temporary directory renamed when complete, so an
  interrupted conversion leaves no ``directory``. WeightsError if it exists."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise WeightsError(f'{directory} exists; choose a new output directory')
  partial = f'{directory}.partial'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(partial, VARIABLES_DIR), variables)
  checkpointer.wait_until_finished()
  checkpointer.close()
  with open(os.path.join(partial, MODEL_JSON), 'w') as f:
    json.dump(info, f, indent=2)
  os.replace(partial, directory)


def load_converted(directory: str):
  """(model, variables) from a ``save_converted`` directory; no torch needed."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, MODEL_JSON)) as f:
    info = json.load(f)
  model = models.get_model(info['name'], info['num_classes'], **info['options'])
  side, channels = info['image_size'], info['channels']
  images = jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  abstract = {k: v for k, v in abstract.items() if k in ('params', 'batch_stats')}
  checkpointer = ocp.StandardCheckpointer()
  variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR), abstract)
  checkpointer.close()
  return model, variables


def _state_and_options(name: str, path: str) -> tuple[dict, dict]:
  """(tensors by state_dict key, the get_model options they fit) of a weights file or a
  ``bcam-weights convert`` directory for model ``name``."""
  _check_name(name)
  if not os.path.isdir(path):
    state = _read(name, path)
    return state, _model_from_file(name, state, path)[0]
  if not os.path.isfile(os.path.join(path, MODEL_JSON)):
    raise WeightsError(
      f'{path}: a directory without {MODEL_JSON}; not a bcam-weights convert output'
    )
  with open(os.path.join(path, MODEL_JSON)) as f:
    info = json.load(f)
  if info['name'] != name:
    raise WeightsError(f'{path} holds {info["name"]} weights, not {name}')
  _, variables = load_converted(path)
  rules = _rules(name, info['options'])
  state = {
    _file_key(var_path, rules): _to_file_layout(np.asarray(value), var_path[-1])
    for var_path, value in traverse_util.flatten_dict(variables).items()
  }
  return state, info['options']


def pretrained_variables(name: str, model, path: str, variables: dict) -> tuple[dict, list[str]]:
  """(``variables`` with the published weights at ``path`` placed, notes on what was not
  taken as it is): how training starts from published weights (``config.init.pretrained``).

  ``model`` is a ``name`` model with any head and pooling and ``variables`` its initial
  ``{'params', 'batch_stats'}``; ``path`` a state_dict file (as ``load_pretrained`` reads)
  or a ``bcam-weights convert`` directory. Taken from the weights: every backbone variable
  (BatchNorm statistics too) and every head variable the weights have (a ViT's last block
  and final norm in its default head, ConvNeXt's head norm). Kept at their initial values:
  the classifier (always: fresh for the data's classes), Soft-CAM's evidence conv and
  CA-Stream's stream, which published weights lack. For 1-channel images a first conv
  trained on RGB is summed over its three input channels (as timm's ``in_chans=1``), which
  sees a grey image as three equal channels. A backbone variable the weights lack or hold
  in another shape, a weights tensor nothing takes (other than the file's classifier or head
  norm) or model options other than the weights' (``stem``, ``width``, a ViT's sizes) are a
  WeightsError naming them. Loaded values are float32 numpy arrays.
  """
  state, options = _state_and_options(name, path)
  for key, value in options.items():
    if getattr(model, key) != value:
      raise WeightsError(
        f'{path} holds {name} weights with {key}={value!r}; this model has {key}='
        f'{getattr(model, key)!r} (config.model.options.{key}={value!r} fits them)'
      )
  rules, classifier = _rules(name, options), _classifier_prefix(name)
  head = 'head.' if name in VITS + CONVNEXTS else classifier  # the file's, unused by some heads
  placed, used, problems, notes, fresh = {}, set(), [], [], set()
  for var_path, target in traverse_util.flatten_dict(variables).items():
    leaf, key = var_path[-1], _file_key(var_path, rules)
    expected = _file_shape(target.shape, leaf)
    if key.startswith(classifier) or (key not in state and var_path[1] != 'backbone_net'):
      placed[var_path] = target  # the classifier, evidence conv, CA-Stream: fresh
      fresh.add('/'.join(var_path[1:-1]))
      continue
    used.add(key)
    found = tuple(state[key].shape) if key in state else None
    if found == expected:
      placed[var_path] = _from_file_layout(np.asarray(state[key], np.float32), leaf)
    elif found and len(found) == 4 and found[1] == 3 and expected == (found[0], 1, *found[2:]):
      summed = np.asarray(state[key], np.float32).sum(axis=1, keepdims=True)
      placed[var_path] = _from_file_layout(summed, leaf)
      notes.append(f'{key} summed over its 3 input channels for 1-channel images')
    elif found is None:
      problems.append(f'key {key!r} is missing (expected shape {expected})')
    else:
      hint = ''
      if key == 'pos_embed':
        patch = options['patch_size']
        side = math.isqrt(found[1] - 1) * patch
        hint = f'; the weights are for {side}x{side} images: set config.data.image_size={side}'
      problems.append(f'key {key!r} has shape {found}, expected {expected}{hint}')
  unused = [k for k in state if k not in used and not k.endswith('num_batches_tracked')]
  for key in unused:
    if not key.startswith(head):
      problems.append(f'unexpected key {key!r} of shape {tuple(state[key].shape)}')
  if problems:
    more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
    raise WeightsError(f'{path} does not fit {model.label()}: {problems[0]}{more}')
  if fresh:
    notes.append('initialised fresh: ' + ', '.join(sorted(fresh)))
  if unused:
    notes.append('not used: ' + ', '.join(sorted(unused)))
  return traverse_util.unflatten_dict(placed), notes
