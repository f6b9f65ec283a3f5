"""The scripts under examples/ run as a user runs them (`python examples/<name>.py`, from the
clone's root) and print what their docstrings promise; a few training steps each, so the
numbers are not checked, only that every stage ran and the figure was written.

The three run at once, each in its own process, with XLA's backend optimisation off as every
process of the suite (tests/conftest.py): at a few steps compiling is nearly all their time.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXAMPLES = {
  'explain_linen_cnn': (
    ['--steps=3', '--n_explain=8'],
    [
      'training SmallCNN for 3 steps',
      'test accuracy:',
      'layers the explainer can explain:',
      'method            drop  increase  insertion  deletion  in-square',
      'grad_cam ',
      'score_cam ',
      'layer_cam ',
      'ablation_cam ',
    ],
  ),
  'nnx_batch_cam_loss': (
    ['--steps=3'],
    [
      'training Net with lambda=0 for 3 steps',
      'training Net with lambda=1 for 3 steps',
      'ce ',
      'cam_l1 ',
      'Grad-CAM mass inside the square',
      '  lambda  accuracy  in-square',
    ],
  ),
  'explain_vit_tokens': (
    ['--steps=3'],
    [
      'training TinyViT for 3 steps',
      'block1 output (tokens): (1, 37, 32)',
      'block1 as explained (patch grid): (1, 6, 6, 32)',
      'grad_cam ',
      'hires_cam ',
      'layer_cam ',
      'eigen_cam ',
    ],
  ),
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{name: (completed process output, its out_dir)}, the three run in parallel."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONPATH=REPO,
  )
  started = {}
  for name, (flags, _) in EXAMPLES.items():
    out_dir = tmp_path_factory.mktemp(name)
    command = [sys.executable, f'examples/{name}.py', f'--out_dir={out_dir}', *flags]
    process = subprocess.Popen(
      command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    started[name] = (process, out_dir)
  results = {}
  for name, (process, out_dir) in started.items():
    output, _ = process.communicate(timeout=300)
    results[name] = (process.returncode, output, out_dir)
  return results


@pytest.mark.parametrize('name', list(EXAMPLES))
def test_example_runs_and_writes_its_figure(runs, name):
  returncode, output, out_dir = runs[name]
  assert returncode == 0, output
  for line in EXAMPLES[name][1]:
    assert line in output, f'{line!r} not in the output of {name}:\n{output}'
  assert f'wrote {out_dir / (name + ".png")}' in output
  assert (out_dir / f'{name}.png').stat().st_size > 1000
