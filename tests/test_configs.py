"""The experiment config: its argument gives each model x condition config."""

import importlib

import pytest

from configs import experiment

ARGS = {
  'baseline': '',
  'proto': ',loss=proto',
  'bcpl': ',loss=bcpl',
  'softcam': ',head=softcam',
  'castream': ',pooling=ca_stream',
}


@pytest.mark.parametrize('model', ('simple_cnn', 'resnet18', 'convnext_v2_tiny'))
@pytest.mark.parametrize('variant', tuple(ARGS))
def test_argument_gives_the_model_condition_config(model, variant):
  old = importlib.import_module(f'configs.{model}_{variant}').get_config()
  new = experiment.get_config(f'model={model}{ARGS[variant]}')
  assert new.to_json(sort_keys=True) == old.to_json(sort_keys=True)
