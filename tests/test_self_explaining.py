"""Soft-CAM evidence heads and CA-Stream attention pooling: equivalences, shapes, training."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from bcam_jax import conditions, config_validation, eval_lib, explain, optim, run_setup, train_lib
from bcam_jax import objective as objective_lib
from bcam_jax.configs import experiment
from bcam_jax.models import get_model, head_fn, init_variables, param_count
from bcam_jax.models.base import is_stream_param
from bcam_jax.models.heads import CAStream, Pool, cross_attention
from bcam_jax.run_spec import RunSpec
from tests import synthetic
from tests.test_train import tiny_config

C = 10


def test_softcam_with_dense_weights_gives_the_logits_of_gap_dense():
  """The equivalence Soft-CAM rests on: mean_hw(A W + b) = mean_hw(A) W + b."""
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  dense = get_model('resnet18', C, width=4)
  variables = init_variables(dense, jax.random.key(1), 28)
  soft = get_model('resnet18', C, width=4, head='softcam')
  params = dict(variables['params'])
  params['head_net'] = {'evidence': params['head_net']['dense']}
  soft_vars = {'params': params, 'batch_stats': variables['batch_stats']}
  np.testing.assert_allclose(
    soft.apply(soft_vars, x)[0], dense.apply(variables, x)[0], rtol=1e-5, atol=1e-5
  )
  features = soft.apply(soft_vars, x, method='backbone')
  evidence = soft.apply(soft_vars, features['cam'], method='evidence')
  kernel, bias = params['head_net']['evidence']['kernel'], params['head_net']['evidence']['bias']
  np.testing.assert_allclose(
    evidence, np.einsum('nhwk,kc->nhwc', features['cam'], kernel) + bias, rtol=1e-5, atol=1e-5
  )


def test_cross_attention_with_zero_query_is_global_average_pooling():
  f = jax.random.normal(jax.random.key(0), (3, 4, 5, 6))
  pooled, attention = cross_attention(f, jnp.zeros((3, 6)))
  np.testing.assert_allclose(pooled, f.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(attention, np.full((3, 4, 5), 1 / 20), rtol=1e-6)


def test_cross_attention_equals_a_per_sample_softmax_loop():
  f = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 3, 4)))
  q = np.asarray(jax.random.normal(jax.random.key(1), (2, 4)))
  pooled, attention = cross_attention(f, q)
  for i in range(2):
    scores = f[i].reshape(9, 4) @ q[i] / 2.0  # sqrt(d) = 2
    a = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    np.testing.assert_allclose(attention[i].ravel(), a, rtol=1e-5)
    np.testing.assert_allclose(pooled[i], f[i].reshape(9, 4).T @ a, rtol=1e-5, atol=1e-6)


# Evidence (N=2, h=2, w=1, C=2): image 0 has |.| sum 6, squares sum 14; image 1 has |.| sum
# 4, squares sum 6; over all 8 values |.| sums to 10 and squares to 20.
_EVIDENCE = jnp.array([[[[1.0, -2.0]], [[3.0, 0.0]]], [[[0.0, 1.0]], [[-1.0, 2.0]]]])


def test_elastic_net_sum_is_the_papers_per_image_sum_averaged_over_the_batch():
  got = objective_lib.elastic_net(_EVIDENCE, 0.5, 0.25, 'sum')
  np.testing.assert_allclose(got, ((0.5 * 6 + 0.25 * 14) + (0.5 * 4 + 0.25 * 6)) / 2)
  assert float(objective_lib.elastic_net(_EVIDENCE, 0.0, 0.0, 'sum')) == 0.0


def test_elastic_net_mean_is_the_mean_over_images_positions_and_classes():
  got = objective_lib.elastic_net(_EVIDENCE, 0.5, 0.25, 'mean')
  np.testing.assert_allclose(got, 0.5 * 10 / 8 + 0.25 * 20 / 8)
  # The 'mean' penalty is the 'sum' one over h * w * C = 4 positions x classes.
  np.testing.assert_allclose(got, objective_lib.elastic_net(_EVIDENCE, 0.5, 0.25, 'sum') / 4)


def test_objective_penalty_follows_the_configs_reduction():
  config = experiment.get_config('model=simple_cnn,head=softcam')
  config.loss.lambda_l1 = 0.5
  assert config.loss.elastic_net_reduction == 'sum'  # the paper's form is the default
  penalty = lambda: objective_lib.Objective.from_config(config, 2).penalty(_EVIDENCE)
  np.testing.assert_allclose(penalty(), 0.5 * (6 + 4) / 2)
  config.loss.elastic_net_reduction = 'mean'
  np.testing.assert_allclose(penalty(), 0.5 * 10 / 8)


def test_condition_names_say_which_elastic_net_units_their_lambdas_are_in():
  config = experiment.get_config('model=simple_cnn,head=softcam')
  assert _describe(config) == 'baseline softcam'
  config.loss.lambda_l1 = 2e-5
  assert _describe(config) == 'baseline softcam l1=2e-05'
  config.loss.lambda_l1, config.loss.elastic_net_reduction = 0.01, 'mean'
  assert _describe(config) == 'baseline softcam l1=0.01 (mean)'


def _stream_params(widths: tuple[int, ...]) -> int:
  """CA-Stream's parameter count by hand for stage widths d_0..d_L: q_0, then W_l
  (d_l x d_{l+1} + bias) for l < L and the square W_L (d_L x d_L + bias)."""
  count = widths[0] + widths[-1] * widths[-1] + widths[-1]
  for d, following in zip(widths[:-1], widths[1:]):
    count += d * following + following
  return count


_RESNET50 = {'stem': 64, 'stage1': 256, 'stage2': 512, 'stage3': 1024, 'cam': 2048}


@pytest.mark.parametrize(
  'start,expected,paper_millions',
  [
    (0, 6_969_152, 6.96),
    (1, 6_952_704, 6.95),
    (2, 6_821_376, 6.82),
    (3, 6_296_576, 6.29),
    (4, 4_198_400, 4.20),
  ],
)
def test_stream_parameters_match_the_paper_for_resnet50_widths(start, expected, paper_millions):
  """Table 5 of the paper, S_start - S_4 for ResNet-50 (its #PARAM rounds to 0.01M): the
  stream q_0 -> q_L (`CAStream`, from a fake features dict) plus W_L (the head's `Pool`).
  Without W_L the S4-S4 stream would have 2,048 parameters, not 4.20M."""
  stages = tuple(_RESNET50)[start:-1]
  features = {k: jax.ShapeDtypeStruct((2, 3, 3, d), jnp.float32) for k, d in _RESNET50.items()}
  stream = jax.eval_shape(CAStream(stages).init, jax.random.key(0), features)
  query = jax.ShapeDtypeStruct((2, 2048), jnp.float32)
  last = jax.eval_shape(Pool().init, jax.random.key(0), features['cam'], query)
  count = param_count(stream) + param_count(last)
  assert count == expected == _stream_params(tuple(_RESNET50.values())[start:])
  assert abs(count / 1e6 - paper_millions) < 0.01


# Each model's stream widths d_0..d_L (stem and stages), and how the CA-Stream classifier's
# size differs from the default one (simple_cnn's dense takes the pooled 64, not 7*7*64).
_MODEL_STREAMS = {
  'simple_cnn': ((32, 64, 64), 64 * C - 7 * 7 * 64 * C),
  'resnet18': ((64, 64, 128, 256, 512), 0),
  'convnext_v2_tiny': ((96, 96, 192, 384, 768), 0),
}


@pytest.mark.parametrize('name', _MODEL_STREAMS)
def test_stream_parameters_of_our_models(name):
  """The CA-Stream model has the default model's parameters plus the stream's (q_0, W_0..W_L),
  which are exactly those `is_stream_param` selects; the default tree has none of them.
  Shape inference only."""
  widths, classifier_change = _MODEL_STREAMS[name]
  trees = {}
  for pooling in ('default', 'ca_stream'):
    model = get_model(name, C, pooling=pooling)
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)['params']
    trees[pooling] = traverse_util.flatten_dict(params)
  stream = {p: v for p, v in trees['ca_stream'].items() if is_stream_param(p)}
  assert not any(is_stream_param(p) for p in trees['default'])
  assert param_count(stream) == _stream_params(widths)
  assert (
    param_count(trees['ca_stream']) - param_count(trees['default'])
    == _stream_params(widths) + classifier_change
  )


def _softmax_pool(cam: np.ndarray, query: np.ndarray) -> np.ndarray:
  """CA_L by a loop over samples: softmax over positions of F q / sqrt(d), then F^T a."""
  out = []
  for f, q in zip(cam, query):
    f = f.reshape(-1, f.shape[-1])
    scores = f @ q / np.sqrt(f.shape[-1])
    a = np.exp(scores - scores.max())
    out.append(f.T @ (a / a.sum()))
  return np.stack(out)


@pytest.mark.parametrize('name', _MODEL_STREAMS)
def test_ca_head_applies_w_l_between_the_last_block_and_the_classifier(name):
  """Logits = classifier(W_L CA_L(q_L, F_L) + b_L), by hand from the params tree
  (ConvNeXt's classifier: LayerNorm then dense)."""
  model = get_model(name, C, pooling='ca_stream')
  head = model.make_head()
  d = _MODEL_STREAMS[name][0][-1]
  cam = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 3, d)))
  query = np.asarray(jax.random.normal(jax.random.key(1), (2, d))) * 0.3
  params = head.init(jax.random.key(2), cam, query)['params']
  w_l = params['pool']['stream_out']
  x = _softmax_pool(cam, query) @ np.asarray(w_l['kernel']) + np.asarray(w_l['bias'])
  if 'norm' in params:
    centred = x - x.mean(axis=-1, keepdims=True)
    x = centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + 1e-6)
    x = x * np.asarray(params['norm']['scale']) + np.asarray(params['norm']['bias'])
  want = x @ np.asarray(params['dense']['kernel']) + np.asarray(params['dense']['bias'])
  got = head.apply({'params': params}, cam, query)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['resnet18', 'convnext_v2_tiny'])
def test_zero_query_and_identity_w_l_give_the_default_gap_head(name):
  cam = jax.random.normal(jax.random.key(0), (2, 3, 3, _MODEL_STREAMS[name][0][-1]))
  default = get_model(name, C).make_head()
  variables = default.init(jax.random.key(1), cam)
  d = cam.shape[-1]
  identity = {'kernel': jnp.eye(d), 'bias': jnp.zeros(d)}
  ca_params = variables['params'] | {'pool': {'stream_out': identity}}
  ca = get_model(name, C, pooling='ca_stream').make_head()
  np.testing.assert_allclose(
    ca.apply({'params': ca_params}, cam, jnp.zeros((2, d))),
    default.apply(variables, cam),
    rtol=1e-5,
    atol=1e-5,
  )


def test_train_only_updates_exactly_the_stream_parameters():
  """The frozen protocol's optimiser: q_0, W_0..W_{L-1} and W_L (in the head) move, the
  classifier beside W_L and the backbone do not."""
  params = {
    'backbone_net': {'conv': {'kernel': jnp.ones((2, 2))}},
    'head_net': {
      'dense': {'kernel': jnp.ones((2, 2))},
      'pool': {'stream_out': {'bias': jnp.ones(2)}},
    },
    'stream': {'query': jnp.ones(2)},
  }
  tx = optim.train_only(optax.sgd(0.1), is_stream_param)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  moved = {p for p, u in traverse_util.flatten_dict(updates).items() if np.any(u != 0)}
  assert moved == {('head_net', 'pool', 'stream_out', 'bias'), ('stream', 'query')}


_OPTIONS = {('convnext_v2_tiny', 112): {'stem_stride': 4}}


@pytest.mark.parametrize('name', _MODEL_STREAMS)
@pytest.mark.parametrize('size', [28, 112])
def test_evidence_and_attention_shapes(name, size):
  """Shape inference only (no compute), every backbone at both image sizes."""
  options = _OPTIONS.get((name, size), {})
  x = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
  for head, pooling in (('softcam', 'default'), ('default', 'ca_stream')):
    model = get_model(name, C, head=head, pooling=pooling, **options)

    def maps(images, model=model):
      variables = model.init(jax.random.key(0), images)
      variables = {k: v for k, v in variables.items() if k != 'perturbations'}
      logits, features = model.apply(variables, images)
      method = 'evidence' if head == 'softcam' else 'attention'
      args = (features['cam'],) if head == 'softcam' else (features['cam'], features['ca_query'])
      return logits, features['cam'], model.apply(variables, *args, method=method)

    logits, cam_map, out = jax.eval_shape(maps, x)
    h, w = cam_map.shape[1:3]
    assert logits.shape == (2, C)
    assert out.shape == ((2, h, w, C) if head == 'softcam' else (2, h, w)), (head, out.shape)


@pytest.mark.parametrize('kind', ['softcam', 'ca_stream'])
def test_new_heads_are_per_sample(kind):
  model = get_model(
    'resnet18',
    C,
    width=2,
    **({'head': 'softcam'} if kind == 'softcam' else {'pooling': 'ca_stream'}),
  )
  variables = init_variables(model, jax.random.key(0), 12)
  x = jax.random.normal(jax.random.key(1), (3, 12, 12, 1))
  features = model.apply(variables, x, method='backbone')
  head = head_fn(model, variables, features)
  together = head(features['cam'])
  for i in range(3):
    alone = model.apply(
      variables,
      features['cam'][i : i + 1],
      None if kind == 'softcam' else features['ca_query'][i : i + 1],
      method='head',
    )
    np.testing.assert_allclose(together[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_bcpl_with_softcam_uses_the_label_evidence():
  """Batch-CAM term from evidence maps against a per-class loop."""
  evidence = jax.random.normal(jax.random.key(0), (6, 3, 3, 4))
  labels = jnp.array([0, 2, 2, 1, 0, 2])
  prototypes = jax.random.uniform(jax.random.key(1), (4, 8, 8))
  objective = objective_lib.Objective(kind='bcpl', metric='l1', num_classes=4, prototype_size=8)
  maps = jnp.take_along_axis(evidence, labels[:, None, None, None], axis=-1)[..., 0]
  got = objective.cam_term(objective_lib.EvidenceExplanation(maps), labels, prototypes)
  want = 0.0
  for c in range(3):  # class 3 is absent
    mean = np.asarray(evidence)[np.asarray(labels) == c, :, :, c].mean(axis=0)
    m = objective.prototype_space(jnp.maximum(jnp.asarray(mean), 0.0))
    want += float(jnp.mean(jnp.abs(m - prototypes[c])))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  return synthetic.write_dataset(str(tmp_path_factory.mktemp('idx')))


def _tiny_resnet(config):
  config.model.options.width = 2
  config.optimizer.learning_rate = 0.05
  return config


def test_frozen_backbone_trains_only_the_stream(idx_dir, tmp_path):
  """Everything restored from the baseline (backbone, classifier, BatchNorm statistics) stays
  bit-identical; every stream parameter, W_L in the head included, trains."""
  baseline_dir, ca_dir = str(tmp_path / 'baseline'), str(tmp_path / 'ca')
  baseline_config = _tiny_resnet(tiny_config(idx_dir, 'model=resnet18', 10))
  train_lib.train_and_evaluate(baseline_config, baseline_dir)
  _, baseline, _ = eval_lib.restore(baseline_config, baseline_dir, 'best')
  config = _tiny_resnet(tiny_config(idx_dir, 'model=resnet18,pooling=ca_stream', 10))
  config.model.ca_stream.freeze_backbone = True
  config.init_from = baseline_dir
  trained = jax.device_get(train_lib.train_and_evaluate(config, ca_dir)['state'])
  params = traverse_util.flatten_dict(trained.params)
  restored = traverse_util.flatten_dict(baseline['params'])
  assert {p for p in params if not is_stream_param(p)} == set(restored)
  for path, value in restored.items():
    np.testing.assert_array_equal(value, params[path], err_msg=str(path))
  for a, b in zip(jax.tree.leaves(baseline['batch_stats']), jax.tree.leaves(trained.batch_stats)):
    np.testing.assert_array_equal(a, b)
  initial = traverse_util.flatten_dict(
    init_variables(get_model('resnet18', C, width=2, pooling='ca_stream'), jax.random.key(0), 28)[
      'params'
    ]
  )
  stream = [p for p in initial if is_stream_param(p)]
  assert ('head_net', 'pool', 'stream_out', 'kernel') in stream and ('stream', 'query') in stream
  for path in stream:
    assert not np.array_equal(initial[path], params[path]), path


def test_frozen_simple_cnn_reports_its_incompatible_classifier(idx_dir, tmp_path):
  baseline_dir = str(tmp_path / 'baseline')
  train_lib.train_and_evaluate(tiny_config(idx_dir, num_steps=10), baseline_dir)
  config = tiny_config(idx_dir, 'model=simple_cnn,pooling=ca_stream', 10)
  config.model.ca_stream.freeze_backbone = True
  config.init_from = baseline_dir
  with pytest.raises(config_validation.ConfigError, match='head_net parameters do not fit'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'ca'))


def test_softcam_sparse_bcpl_trains_and_explains(idx_dir, tmp_path):
  config = tiny_config(idx_dir, 'model=simple_cnn,head=softcam', 30)
  config.loss.kind, config.loss.lambda_cam, config.loss.lambda_l1 = 'bcpl', 0.1, 0.01
  workdir = str(tmp_path / 'run')
  result = train_lib.train_and_evaluate(config, workdir)
  # The synthetic classes differ by position, which mean-pooled evidence sees only through
  # the borders: check that the objective falls and every term is recorded, not accuracy.
  train = [
    json.loads(line)
    for line in open(os.path.join(workdir, 'metrics.jsonl'))
    if json.loads(line)['split'] == 'train'
  ]
  assert train[-1]['loss'] < train[0]['loss']
  assert all(r['penalty'] > 0 and r['cam'] > 0 for r in train)
  run = run_setup.setup_run(RunSpec.from_config(config))
  variables = result['state'].model_variables()
  explainer = explain.Explainer(run.model, 0.5, 0.25, 28)
  pixels = jnp.asarray(run.datasets.test.images[:4], jnp.float32) / 255.0
  labels = jnp.asarray(run.datasets.test.labels[:4])
  maps = explainer.raw_maps('evidence', variables, pixels, labels)
  x = (pixels - 0.5) / 0.25
  evidence = run.model.apply(
    variables, run.model.apply(variables, x, method='backbone')['cam'], method='evidence'
  )
  np.testing.assert_allclose(
    maps,
    np.maximum(
      np.take_along_axis(np.asarray(evidence), np.asarray(labels)[:, None, None, None], -1)[..., 0],
      0,
    ),
    atol=1e-5,
  )


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('model.head', 'soft', "config.model.head='soft'"),
    ('model.pooling', 'attention', "config.model.pooling='attention'"),
    ('loss.lambda_l1', 0.1, 'need config.model.head="softcam"'),
    (
      'loss.elastic_net_reduction',
      'total',
      "config.loss.elastic_net_reduction='total' is not valid; choose one of",
    ),
    ('model.ca_stream.freeze_backbone', True, 'needs config.model.pooling="ca_stream"'),
  ],
)
def test_invalid_self_explaining_configs_fail_clearly(field, value, message):
  config = experiment.get_config('model=resnet18')
  section, key = field.rsplit('.', 1)
  target = config
  for part in section.split('.'):
    target = target[part]
  target[key] = value
  with pytest.raises(config_validation.ConfigError, match=message.replace('(', r'\(')):
    config_validation.validate_config(config)


def test_freeze_needs_init_from_and_a_compatible_classifier(idx_dir, tmp_path):
  config = experiment.get_config('model=resnet18,pooling=ca_stream')
  config.model.ca_stream.freeze_backbone = True
  with pytest.raises(config_validation.ConfigError, match='needs config.init_from'):
    config_validation.validate_config(config)
  config.init_from = str(tmp_path / 'missing')
  with pytest.raises(config_validation.ConfigError, match='is not a directory'):
    config_validation.validate_config(config)
  softcam_ca = experiment.get_config('model=simple_cnn,head=softcam')
  softcam_ca.model.pooling = 'ca_stream'
  with pytest.raises(config_validation.ConfigError, match='does not combine'):
    config_validation.validate_config(softcam_ca)


def test_raw_attention_is_a_distribution_and_post_hoc_methods_see_the_stream():
  model = get_model('resnet18', C, width=2, pooling='ca_stream')
  variables = init_variables(model, jax.random.key(0), 12)
  explainer = explain.Explainer(model, 0.5, 0.25, 12)
  pixels = jax.random.uniform(jax.random.key(1), (3, 12, 12, 1))
  targets = jnp.array([1, 2, 3])
  attention = explainer.raw_maps('raw_attention', variables, pixels, targets)
  np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  # Grad-CAM through the CA head equals a per-image gradient of the whole model.
  x = (pixels - 0.5) / 0.25
  features = model.apply(variables, x, method='backbone')
  got = explainer.raw_maps('grad_cam', variables, pixels, targets)
  for i in range(3):
    g = jax.grad(
      lambda a: model.apply(variables, a[None], features['ca_query'][i : i + 1], method='head')[
        0, targets[i]
      ]
    )(features['cam'][i])
    want = np.maximum(np.einsum('hwk,k->hw', features['cam'][i], g.mean(axis=(0, 1))), 0)
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='evidence needs a Soft-CAM model'):
    explain.check_applicable(model, variables, ['evidence'])
  with pytest.raises(ValueError, match='raw_attention needs a CA-Stream model'):
    explain.check_applicable(get_model('simple_cnn', C), {}, ['raw_attention'])
  assert explain.default_methods(model)[-1] == 'raw_attention'


def _describe(config) -> str:
  spec = RunSpec.from_config(config)
  return conditions.describe(spec.objective, spec.model)
