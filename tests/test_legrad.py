"""LeGrad (explain.legrad) on a tiny ViT: its maps against a per-image, per-block loop that
differentiates an explicit attention argument, against TorchCAM's LeGrad on a torchvision
twin with the same weights (where torch and torchcam are installed), and the models it
refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcam_jax import cam, explain
from bcam_jax.explain import legrad
from bcam_jax.models import get_model, init_variables

SIZE, PATCH, HIDDEN, DEPTH, HEADS, MLP, CLASSES = 16, 4, 32, 3, 2, 64, 5
TARGETS = jnp.array([0, 3, 1, 4])


@pytest.fixture(scope='module')
def problem():
  """A 3-block ViT (hidden 32, 2 heads, a 4x4 grid) with every parameter randomised, so that
  biases, norms and the class token all matter, and four images."""
  model = get_model(
    'vit_s16', CLASSES, patch_size=PATCH, hidden=HIDDEN, depth=DEPTH, heads=HEADS, mlp_dim=MLP
  )
  rng = np.random.default_rng(0)
  params = init_variables(model, jax.random.key(0), SIZE, 3)['params']
  noisy = lambda v: jnp.asarray(v + 0.2 * rng.normal(size=v.shape), jnp.float32)
  variables = {'params': jax.tree.map(noisy, params)}
  images = jnp.asarray(rng.uniform(size=(4, SIZE, SIZE, 3)), jnp.float32)
  explainer = explain.Explainer(model)
  ours = jax.jit(explainer.raw_maps, static_argnums=0)('legrad', variables, images, TARGETS)
  return explainer, variables, images, np.asarray(ours)


def _norm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _dense(p, x):
  return x @ p['kernel'] + p['bias']


def _attention(p, x):
  """Post-softmax attention `(heads, L, L)` and values `(L, heads, d)` of one image."""
  qkv = _dense(p['attn']['qkv'], _norm(p['norm1'], x)).reshape(len(x), 3, HEADS, -1)
  q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
  scores = jnp.einsum('qhd,khd->hqk', q, k) / np.sqrt(q.shape[-1])
  return jax.nn.softmax(scores, axis=-1), v


def _block(p, x, weights):
  """One image's block output with the attention `weights` given."""
  _, v = _attention(p, x)
  out = jnp.einsum('hqk,khd->qhd', weights, v).reshape(len(x), HIDDEN)
  x = x + _dense(p['attn']['proj'], out)
  mlp = jax.nn.gelu(_dense(p['mlp']['fc1'], _norm(p['norm2'], x)), approximate=False)
  return x + _dense(p['mlp']['fc2'], mlp)


def _layer_score(weights, p, x, head, target):
  """A block's score of `target`: the head's dense(norm(mean of its output tokens)), the
  block's attention `weights` given."""
  return _dense(head['dense'], _norm(head['norm'], _block(p, x, weights).mean(0)))[target]


_score_grad = jax.jit(jax.grad(_layer_score))  # one compilation for every block and image


def _naive_maps(params, image, target):
  """One image's LeGrad map of each block `(blocks, s, s)`: the gradient of that block's
  score with respect to its attention as an explicit argument."""
  backbone, head = params['backbone_net'], params['head_net']
  side = SIZE // PATCH
  patches = image.reshape(side, PATCH, side, PATCH, 3).transpose(0, 2, 1, 3, 4)
  kernel = backbone['patch_embed']['kernel'].reshape(-1, HIDDEN)
  tokens = patches.reshape(side * side, -1) @ kernel + backbone['patch_embed']['bias']
  tokens = jnp.concatenate([backbone['cls_token'][0], tokens]) + backbone['pos_embed'][0]
  blocks = [backbone[f'encoderblock_{i}'] for i in range(DEPTH - 1)] + [head['block']]
  maps = []
  for p in blocks:
    weights, _ = _attention(p, tokens)
    grads = np.asarray(_score_grad(weights, p, tokens, head, target))
    maps.append(np.maximum(grads, 0).mean(axis=(0, 1))[1:].reshape(side, side))
    tokens = _block(p, tokens, weights)
  return np.stack(maps)


def test_maps_equal_a_per_image_loop(problem):
  explainer, variables, images, ours = problem
  assert ours.shape == (4, SIZE // PATCH, SIZE // PATCH) and float(ours.min()) >= 0
  last_two = jax.jit(lambda v, x, t: legrad.legrad(explainer.adapter, v, x, t, blocks=2))(
    variables, explainer.normalize(images), TARGETS
  )
  differences = []
  for i in range(4):
    naive = _naive_maps(variables['params'], images[i], int(TARGETS[i]))
    scale = naive.mean(0).max()
    differences.append(np.abs(np.asarray(ours[i]) - naive.mean(0)).max() / scale)
    np.testing.assert_allclose(ours[i], naive.mean(0), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(last_two[i], naive[-2:].mean(0), rtol=1e-5, atol=1e-5 * scale)
  print(f'LeGrad vs per-image loop: max relative difference {max(differences):.2e}')
  scaled = jax.jit(explainer.maps, static_argnums=0)('legrad', variables, images, TARGETS)
  assert scaled.shape == (4, SIZE, SIZE) and float(scaled.max()) == pytest.approx(1.0)
  with pytest.raises(ValueError, match='blocks=0; expected at least one block'):
    legrad.legrad(explainer.adapter, variables, images, TARGETS, blocks=0)


def test_refuses_other_models():
  cnn = get_model('simple_cnn', CLASSES)
  cnn_variables = init_variables(cnn, jax.random.key(0), SIZE, 1)
  with pytest.raises(ValueError, match='needs one of our Vision Transformers'):
    explain.check_applicable(cnn, cnn_variables, ['legrad'])
  softcam = get_model(
    'vit_s16', CLASSES, head='softcam', patch_size=PATCH, hidden=HIDDEN, depth=2, heads=HEADS
  )
  with pytest.raises(ValueError, match="default head .* head='softcam'"):
    explain.check_applicable(softcam, {}, ['legrad'])
  with pytest.raises(ValueError, match='explains the last layer only'):
    explain.Explainer(cnn, layer='stage1').raw_maps(
      'legrad', cnn_variables, jnp.zeros((1, SIZE, SIZE, 1)), TARGETS[:1]
    )


def _torchvision_twin(variables, torch, torchvision):
  """torchvision's VisionTransformer with our weights: fused qkv as in_proj, linear weights
  transposed, the conv kernel HWIO -> OIHW, the head's block as the last encoder layer."""
  # (image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
  twin = torchvision.models.VisionTransformer(
    SIZE, PATCH, DEPTH, HEADS, HIDDEN, MLP, num_classes=CLASSES
  )
  backbone, head = variables['params']['backbone_net'], variables['params']['head_net']
  linear = lambda p: {'weight': np.asarray(p['kernel']).T, 'bias': p['bias']}
  norm = lambda p: {'weight': p['scale'], 'bias': p['bias']}
  state = {
    'conv_proj.weight': np.asarray(backbone['patch_embed']['kernel']).transpose(3, 2, 0, 1),
    'conv_proj.bias': backbone['patch_embed']['bias'],
    'class_token': backbone['cls_token'],
    'encoder.pos_embedding': backbone['pos_embed'],
  }
  parts = {'encoder.ln': norm(head['norm']), 'heads.head': linear(head['dense'])}
  blocks = [backbone[f'encoderblock_{i}'] for i in range(DEPTH - 1)] + [head['block']]
  for i, p in enumerate(blocks):
    prefix = f'encoder.layers.encoder_layer_{i}'
    qkv = linear(p['attn']['qkv'])
    state[f'{prefix}.self_attention.in_proj_weight'] = qkv['weight']
    state[f'{prefix}.self_attention.in_proj_bias'] = qkv['bias']
    parts[f'{prefix}.self_attention.out_proj'] = linear(p['attn']['proj'])
    parts[f'{prefix}.ln_1'] = norm(p['norm1'])
    parts[f'{prefix}.ln_2'] = norm(p['norm2'])
    parts[f'{prefix}.mlp.0'] = linear(p['mlp']['fc1'])
    parts[f'{prefix}.mlp.3'] = linear(p['mlp']['fc2'])
  state |= {f'{name}.{leaf}': v for name, part in parts.items() for leaf, v in part.items()}
  twin.load_state_dict({k: torch.tensor(np.array(v)) for k, v in state.items()})
  return twin.eval()


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch under numpy 2
def test_equals_torchcam_legrad(problem, record_property):
  """TorchCAM 0.5.0's LeGrad over every encoder layer of the torchvision twin, raw and
  normalised, against ours."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  torchcam_methods = pytest.importorskip('torchcam.methods')

  explainer, variables, images, ours = problem
  twin = _torchvision_twin(variables, torch, torchvision)
  x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
  logits = explainer.logits(variables, images)
  with torch.no_grad():
    np.testing.assert_allclose(twin(x).numpy(), logits, rtol=1e-5, atol=1e-5)
  targets = [int(c) for c in TARGETS]
  with torchcam_methods.LeGrad(twin, list(twin.encoder.layers)) as extractor:
    raw = extractor(targets, twin(x), normalized=False)[0].detach().numpy()
  with torchcam_methods.LeGrad(twin, list(twin.encoder.layers)) as extractor:
    normalised = extractor(targets, twin(x))[0].detach().numpy()
  difference = float(np.abs(ours - raw).max() / np.abs(raw).max())
  # TorchCAM's normalisation, (m - min) / (max(m - min) + 1e-8); ours (cam.normalize_cam)
  # divides by max(max - min, 1e-8), which on maps of order 1e-3 differs by ~1e-6.
  shifted = ours - ours.min(axis=(1, 2), keepdims=True)
  scaled = shifted / (shifted.max(axis=(1, 2), keepdims=True) + 1e-8)
  scaled_difference = float(np.abs(scaled - normalised).max())
  ours_scaled = np.asarray(cam.normalize_cam(jnp.asarray(ours)))
  assert np.abs(ours_scaled - normalised).max() < 1e-4
  record_property('max_relative_difference', difference)
  record_property('max_abs_difference_normalised', scaled_difference)
  print(
    f'LeGrad vs TorchCAM: raw max relative difference {difference:.2e}, '
    f'normalised max abs difference {scaled_difference:.2e}'
  )
  assert difference < 1e-5 and scaled_difference < 1e-5
