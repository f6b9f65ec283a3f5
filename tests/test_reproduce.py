"""Tests of the reproduction grids (bcam_jax.grids, reproduce.py), on a 2-cell grid."""

import csv
import importlib
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from bcam_jax import eval_options, grids
from bcam_jax.configs import experiment
from tests import synthetic
from tests.test_train import REPO

GRIDS = ('cpu_small', 'gpu_table1', 'paper_table1', 'paper_table2')


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  return synthetic.write_dataset(str(tmp_path_factory.mktemp('idx')))


def tiny_grid(idx_dir) -> ml_collections.ConfigDict:
  grid = ml_collections.ConfigDict()
  grid.name = 'tiny'
  grid.description = 'Two SimpleCNN cells on synthetic data.'
  grid.blocks = [
    dict(
      models=('simple_cnn',),
      conditions=('baseline', 'bcpl-l1'),
      datasets=('mnist',),
      image_sizes=(28,),
      seeds=(0,),
      epochs=1,
    )
  ]
  grid.overrides = (
    ('data.source', 'idx'),
    ('data.idx_dir', idx_dir),
    ('data.val_size', 40),
    ('train.batch_size', 16),
    ('train.num_steps', 12),
    ('train.checkpoint_every_steps', 6),
    ('train.log_every_steps', 4),
    ('optimizer.warmup_steps', 2),
    ('eval.batch_size', 40),
  )
  grid.eval = ml_collections.ConfigDict(dict(num_images=16, n_steps=3))
  return grid


def test_grid_runs_aggregates_and_resumes(idx_dir, tmp_path):
  grid, root, results = tiny_grid(idx_dir), str(tmp_path / 'runs'), str(tmp_path / 'results')
  records, failures = grids.run_grid(grid, root, experiment.get_config)
  assert failures == {}
  assert [r['condition'] for r in records] == ['baseline', 'bcpl-l1']
  for r in records:
    cell_dir = os.path.join(root, r['name'])
    assert json.load(open(os.path.join(cell_dir, 'cell.json'))) == r
    assert json.load(open(os.path.join(cell_dir, 'config.json')))['train']['num_steps'] == 12
    assert 0.0 <= r['test_accuracy'] <= 100.0 and r['train_images_per_second'] > 0
    # The record's metrics are the eval report's, on the best checkpoint.
    metrics = json.load(open(os.path.join(cell_dir, 'eval', 'metrics.json')))
    assert r['test_accuracy'] == pytest.approx(100 * metrics['test_accuracy'])
    assert r['alignment_l1'] == metrics['methods']['grad_cam']['alignment_l1']
  bcpl = json.load(open(os.path.join(root, records[1]['name'], 'config.json')))
  assert (bcpl['loss']['kind'], bcpl['loss']['metric']) == ('bcpl', 'l1')

  rows = grids.write_results(grid, records, root, results)
  assert len(rows) == 2 and rows[0]['accuracy_std'] is None  # one seed: no std
  with open(os.path.join(results, 'results.csv')) as f:
    table = list(csv.DictReader(f))
  assert [row['name'] for row in table] == [r['name'] for r in records]
  text = open(os.path.join(results, 'results.md')).read()
  assert '| simple_cnn | mnist | 28 | baseline | 1 | 1 |' in text
  assert '## BCPL against the baseline' in text
  assert "## Against the paper's tables" in text
  assert '`simple_cnn` is our SimpleCNN (conv3x3(32)' in text  # not the paper's network
  convention = grids.insertion_deletion_convention(grid)
  assert convention == (
    "28 px: insertion from RISE's 5x5 blur of sigma 5, deletion to 0 in normalised space (the "
    'dataset mean), 3 equal steps'
  )
  assert f'insertion/deletion: {convention}.' in text
  figure = 'cam_prototypes_simple_cnn_mnist_28.png'
  assert f'![{figure}]({figure})' in text and os.path.exists(os.path.join(results, figure))

  # Resume: a finished cell is skipped; a cell killed after training (no cell.json) is only
  # evaluated again, from its final checkpoint, without training a step more.
  done_cell = os.path.join(root, records[0]['name'], 'cell.json')
  before = os.stat(done_cell).st_mtime_ns
  os.remove(os.path.join(root, records[1]['name'], 'cell.json'))
  again, _ = grids.run_grid(grid, root, experiment.get_config)
  assert os.stat(done_cell).st_mtime_ns == before
  assert again[0] == records[0]
  assert again[1]['test_accuracy'] == pytest.approx(records[1]['test_accuracy'])
  log = [json.loads(line) for line in open(os.path.join(root, records[1]['name'], 'metrics.jsonl'))]
  assert max(r['step'] for r in log if r['split'] == 'train') == 12


def test_a_failing_cell_is_reported_and_the_grid_goes_on(idx_dir, tmp_path):
  grid = tiny_grid(idx_dir)
  grid.blocks = [
    dict(
      grid.blocks[0],
      conditions=('baseline',),
      overrides=(('data.idx_dir', str(tmp_path / 'missing')),),
    ),
    dict(grid.blocks[0], conditions=('bcpl-l1',)),
  ]
  grid.overrides = tuple(kv for kv in grid.overrides if kv[0] != 'data.idx_dir')
  grid.blocks[1]['overrides'] = (('data.idx_dir', idx_dir),)
  records, failures = grids.run_grid(grid, str(tmp_path / 'runs'), experiment.get_config)
  assert [r['condition'] for r in records] == ['bcpl-l1']
  ((name, error),) = failures.items()
  assert name == 'simple_cnn_mnist_28_baseline_seed0' and 'missing' in error
  grids.write_results(grid, records, str(tmp_path / 'runs'), str(tmp_path / 'results'), failures)
  text = open(tmp_path / 'results' / 'results.md').read()
  assert '## Failed cells' in text and name in text


def test_aggregate_mean_std_and_paper_difference():
  records = [
    {
      'model': 'simple_cnn',
      'dataset': 'mnist',
      'image_size': 28,
      'condition': 'bcpl-l1',
      'epochs': 2,
      'seed': s,
      'test_accuracy': acc,
      'alignment_l1': l1,
    }
    for s, acc, l1 in ((0, 99.0, 0.1), (1, 99.2, 0.2), (2, 99.4, 0.3))
  ]
  (row,) = grids.aggregate(records)
  assert row['accuracy_mean'] == pytest.approx(99.2)
  assert row['accuracy_std'] == pytest.approx(0.2)  # sample std of 99.0, 99.2, 99.4
  assert row['paper_accuracy'] == 99.00 and row['difference'] == pytest.approx(0.2)
  assert row['alignment_l1'] == pytest.approx(0.2) and row['insertion'] is None


def test_grids_insertion_deletion_conventions():
  """cpu_small keeps the convention its results were measured with; the paper grids use
  CA-Stream's (4 steps at 28 px, 14 at 112)."""
  grid = lambda name: importlib.import_module(f'bcam_jax.configs.grids.{name}').get_config()
  assert grids.insertion_deletion_convention(grid('cpu_small')) == (
    '28 px: insertion from a Gaussian blur of sigma side/10 (2.8 px), deletion to black (0 in '
    'pixel space), 10 equal steps'
  )
  for name in ('paper_table1', 'paper_table2', 'gpu_table1'):
    assert grids.eval_options(grid(name)) == eval_options.EvalOptions(
      methods=('grad_cam',), num_images=2000, num_overlays=4, num_error_pairs=4
    )
  assert "112 px: insertion from RISE's 5x5 blur of sigma 5" in grids.insertion_deletion_convention(
    grid('paper_table2')
  )
  assert '14 steps of 896 pixels' in grids.insertion_deletion_convention(grid('paper_table2'))


@pytest.mark.parametrize('name', GRIDS)
def test_grid_configs_expand_to_valid_cells(name):
  module = importlib.import_module(f'bcam_jax.configs.grids.{name}')
  grid = module.get_config()
  assert grid.name == name
  assert f'--grid=configs/grids/{name}.py' in module.__doc__ and 'Expected' in module.__doc__
  cells = grids.expand(grid)
  assert [c.seed for c in cells] == sorted(c.seed for c in cells)
  for cell in cells:
    grids.cell_config(cell, experiment.get_config)  # validates
  expected = {
    'cpu_small': 7 * 2 * 3 + 2 + 2 * 3,
    'gpu_table1': 3,
    'paper_table1': 3 * 7 * 2 * 3 + 3 * 2 * 3,
    'paper_table2': 2 * 3 * 2 * 3,
  }[name]
  assert len(cells) == expected


def test_cpu_small_ablation_cells_have_workdirs_of_their_own():
  """The ablation block alone is the whole grid's last six cells under the same grid name,
  and none shares a name (workdir) with a cell of the paper's conditions."""
  from bcam_jax.configs.grids import cpu_small

  whole = grids.expand(cpu_small.get_config())
  ablation = grids.expand(cpu_small.get_config('ablation'))
  assert cpu_small.get_config('ablation').name == 'cpu_small'
  assert len(ablation) == 6 and set(ablation) <= set(whole)
  assert {c.condition for c in ablation} == {'bcpl-l1-through_features'}
  assert len({c.name for c in whole}) == len(whole)
  config = grids.cell_config(ablation[0], experiment.get_config)
  assert (config.loss.kind, config.loss.cam_gradient) == ('bcpl', 'through_features')
  with pytest.raises(ValueError, match="cpu_small: argument 'resnet'"):
    cpu_small.get_config('resnet')


def test_gpu_table1_cells_one_at_a_time():
  """Each argument of the GPU grid is one of its cells, under the grid's one name, so three
  processes can train the three cells into one grid folder."""
  from bcam_jax.configs.grids import gpu_table1

  whole = grids.expand(gpu_table1.get_config())
  parts = [grids.expand(gpu_table1.get_config(name)) for name in gpu_table1.CELLS]
  assert [c for (c,) in parts] == whole
  assert {gpu_table1.get_config(name).name for name in gpu_table1.CELLS} == {'gpu_table1'}
  assert {(c.model, c.condition, c.dataset, c.epochs) for c in whole} == {
    ('resnet18', 'baseline', 'fashion_mnist', 15),
    ('resnet18', 'bcpl-l2', 'fashion_mnist', 15),
    ('convnext_v2_tiny', 'bcpl-l1', 'mnist', 20),
  }
  short = grids.expand(gpu_table1.get_config('convnext_bcpl_l1,epochs=1'))
  assert [(c.model, c.epochs) for c in short] == [('convnext_v2_tiny', 1)]
  two = grids.expand(gpu_table1.get_config('resnet18_bcpl_l2+resnet18_baseline'))
  assert two == whole[:2]
  with pytest.raises(ValueError, match="unknown cell 'resnet'; choose one of"):
    gpu_table1.get_config('resnet')


def test_entry_point_lists_the_cells(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      'reproduce.py',
      '--grid=configs/grids/cpu_small.py',
      f'--workdir={tmp_path}',
      '--list',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert len(out) == 7 * 2 * 3 + 2 + 2 * 3
  assert out[0] == 'todo  simple_cnn_mnist_28_baseline_seed0  (2 epoch(s))'


def test_grid_errors_name_the_problem():
  grid = ml_collections.ConfigDict(dict(name='bad', blocks=[dict(models=('simple_cnn',))]))
  with pytest.raises(ValueError, match='block 0: missing field'):
    grids.expand(grid)
  cell = grids.Cell('simple_cnn', 'bcpl-l1', 'mnist', 28, 0, 1, (('train.epochs', 3),))
  with pytest.raises(ValueError, match="override 'train.epochs'.*no field 'epochs'"):
    grids.cell_config(cell, experiment.get_config)
  grid.blocks = [
    dict(
      models=('simple_cnn',),
      conditions=('bcpl-l3',),
      datasets=('mnist',),
      image_sizes=(28,),
      seeds=(0,),
      epochs=1,
    )
  ]
  with pytest.raises(ValueError, match="condition='bcpl-l3'"):
    grids.expand(grid)


def test_verdict_against_the_paper():
  def row(model, dataset, condition, mean, std):
    return {
      'model': model,
      'dataset': dataset,
      'image_size': 28,
      'condition': condition,
      'accuracy_mean': mean,
      'accuracy_std': std,
    }

  rows = [
    row('simple_cnn', 'mnist', 'bcpl-l1', 98.9, 0.2),  # paper 99.00: within std
    row('simple_cnn', 'fashion_mnist', 'bcpl-l1', 91.0, 0.1),  # paper 91.32: below
    row('simple_cnn', 'fashion_mnist', 'baseline', 91.1, 0.1),
    row('resnet18', 'mnist', 'baseline', 99.8, None),
  ]  # paper's bcpl-l2 not run
  verdicts = {(p['model'], p['dataset']): p for p in grids.against_paper(rows)}
  assert verdicts[('simple_cnn', 'mnist')]['verdict'] == 'matches paper'
  fashion = verdicts[('simple_cnn', 'fashion_mnist')]
  assert fashion['verdict'] == 'misses paper' and fashion['gap'] == pytest.approx(-0.32)
  assert fashion['ours_best']['condition'] == 'baseline'
  resnet = verdicts[('resnet18', 'mnist')]
  assert resnet['ours_same_condition'] is None and resnet['verdict'] == 'beats paper'
  assert len(verdicts) == 3


def test_paper_table2_trains_the_table1_networks_for_14x14_maps():
  """Table 2 retrains at 112 for higher-resolution Grad-CAMs (Batch-CAM section 3.5): both
  models keep their 28 px stems and so give 14x14 CAM maps; the 'patchify' variant is the
  cheaper ConvNeXt with 3x3 maps, under its own grid name."""
  from bcam_jax import models
  from bcam_jax.configs.grids import paper_table2

  def sides(grid):
    out = set()
    for cell in grids.expand(grid):
      config = grids.cell_config(cell, experiment.get_config)
      model = models.get_model(config.model.name, 10, **config.model.options)
      out.add((cell.model, model.cam_side(config.data.image_size)))
    return out

  assert sides(paper_table2.get_config()) == {('resnet18', 14), ('convnext_v2_tiny', 14)}
  patchify = paper_table2.get_config('patchify')
  assert patchify.name == 'paper_table2_patchify'
  assert patchify.command.endswith('paper_table2.py:patchify')
  assert sides(patchify) == {('resnet18', 14), ('convnext_v2_tiny', 3)}
  with pytest.raises(ValueError, match="got 'stem4'"):
    paper_table2.get_config('stem4')
