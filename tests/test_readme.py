"""The README's and the docs' examples work as written: every Python block runs, and every
train / eval command shown parses (its config resolves and each `--config.*` override names
a field that exists, with a value of the field's type)."""

import glob
import os
import re
import shlex
import sys

import pytest
from absl import flags

from bcam_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, 'README.md')] + sorted(
  glob.glob(os.path.join(REPO, 'docs', '**', '*.md'), recursive=True)
)
# A line that starts a train or eval command, after any environment assignments.
COMMAND = re.compile(
  r'^(?:srun )?(?:\w+=\S+ )*(bcam-train|bcam-eval|python (?:train|eval)\.py) (.*)$'
)


def _blocks(path: str, *languages: str) -> list[str]:
  """The fenced blocks of the given languages ('' for a bare fence) in a Markdown file,
  without the ones that only include a file (`--8<--`: the example pages show the scripts
  tests/test_examples.py runs)."""
  blocks, language, lines = [], None, []
  for line in open(path, encoding='utf-8').read().splitlines():
    fence = re.fullmatch(r'\s*```\s*(\w*).*', line)
    if fence and language is None:
      language, lines = fence.group(1), []
    elif fence and not fence.group(1):
      if language in languages and not ''.join(lines).lstrip().startswith('--8<--'):
        blocks.append('\n'.join(lines) + '\n')
      language = None
    elif language is not None:
      lines.append(line)
  return blocks


def _commands() -> list[tuple[str, str]]:
  """(page, command) for each train / eval command in a bash block, continuations joined."""
  found = []
  for page in PAGES:
    for block in _blocks(page, 'bash', 'text', ''):
      for line in block.replace('\\\n', ' ').splitlines():
        match = COMMAND.match(line.split('  #')[0].strip())
        if match:
          found.append((os.path.relpath(page, REPO), ' '.join(match.groups())))
  return found


@pytest.mark.parametrize('page', [os.path.relpath(p, REPO) for p in PAGES])
def test_python_examples_run(page):
  for block in _blocks(os.path.join(REPO, page), 'python'):
    namespace = {}
    exec(compile(block, page, 'exec'), namespace)  # pylint: disable=exec-used


def test_the_readme_shows_code_and_commands():
  readme = PAGES[0]
  assert _blocks(readme, 'python'), 'the README lost its Python example'
  shown = [command for page, command in _commands() if page == 'README.md']
  assert 'bcam-train --config=quick --workdir=runs/quick' in shown
  assert 'bcam-eval --workdir=runs/quick' in shown
  assert len(_commands()) >= 12, 'the command scan found too few commands in the docs'


@pytest.mark.parametrize('page,command', _commands())
def test_commands_parse(page, command, monkeypatch):
  """The command's --config and its overrides load as the command would load them."""
  argv = [arg.strip('[]') for arg in shlex.split(command.split(' #')[0])]
  config_args = [arg for arg in argv[1:] if arg.startswith('--config')]
  if not any(arg.startswith('--config=') for arg in config_args):
    assert argv[0] in ('bcam-eval', 'python eval.py'), f'{page}: {command} has no --config'
    return  # bcam-eval reads the config recorded in the workdir (tests/test_user_errors.py)
  values = flags.FlagValues()
  cli.define_config_flag('config', 'the config', flag_values=values)
  monkeypatch.setattr(sys, 'argv', [argv[0], *config_args])
  monkeypatch.chdir(REPO)  # `configs/...` paths are a clone's
  try:
    values([argv[0], *config_args])
  except SystemExit as error:
    pytest.fail(f'{page}: {command}: {error}')
  assert values.config.model.name
