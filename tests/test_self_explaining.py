"""Soft-CAM evidence heads and CA-Stream attention pooling: equivalences, shapes, training."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcam_jax import conditions, config_validation, eval_lib, explain, run_setup, train_lib
from bcam_jax import objective as objective_lib
from bcam_jax.configs import experiment
from bcam_jax.models import MODEL_NAMES, get_model, head_fn, init_variables
from bcam_jax.models.heads import cross_attention
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
  assert conditions.describe(config) == 'baseline softcam'
  config.loss.lambda_l1 = 2e-5
  assert conditions.describe(config) == 'baseline softcam l1=2e-05'
  config.loss.lambda_l1, config.loss.elastic_net_reduction = 0.01, 'mean'
  assert conditions.describe(config) == 'baseline softcam l1=0.01 (mean)'


_OPTIONS = {('convnext_v2_tiny', 112): {'stem_stride': 4}}


@pytest.mark.parametrize('name', MODEL_NAMES)
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
  baseline_dir, ca_dir = str(tmp_path / 'baseline'), str(tmp_path / 'ca')
  baseline_config = _tiny_resnet(tiny_config(idx_dir, 'model=resnet18', 10))
  train_lib.train_and_evaluate(baseline_config, baseline_dir)
  _, baseline, _ = eval_lib.restore(baseline_config, baseline_dir, 'best')
  config = _tiny_resnet(tiny_config(idx_dir, 'model=resnet18,pooling=ca_stream', 10))
  config.model.ca_stream.freeze_backbone = True
  config.init_from = baseline_dir
  trained = jax.device_get(train_lib.train_and_evaluate(config, ca_dir)['state'])
  for part in ('backbone_net', 'head_net'):
    for a, b in zip(
      jax.tree.leaves(baseline['params'][part]), jax.tree.leaves(trained.params[part])
    ):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(baseline['batch_stats']), jax.tree.leaves(trained.batch_stats)):
    np.testing.assert_array_equal(a, b)
  initial = init_variables(
    get_model('resnet18', C, width=2, pooling='ca_stream'), jax.random.key(0), 28
  )['params']['stream']
  for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(trained.params['stream'])):
    assert not np.array_equal(a, b)


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
  run = run_setup.setup_run(config)
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
