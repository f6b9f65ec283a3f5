"""What the commands (bcam_jax/commands/) share: the `--config` flag, which also takes a
packaged config name, and running a command as the program. An error the user can act on (a
bad config field, unreadable data, weights that do not fit the model, a workdir in use or
trained with another model, no usable checkpoint, a diverged loss) ends the program with its
one-paragraph message and exit status 1, without a traceback; any other error keeps its
traceback."""

import json
import os
import re
import sys
from collections.abc import Callable

import ml_collections
from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from bcam_jax import configs, models
from bcam_jax.checkpointing import NoCheckpointError, NoUsableCheckpointError
from bcam_jax.config_validation import ConfigError
from bcam_jax.data import DataError
from bcam_jax.models import WeightsError
from bcam_jax.train_lib import NonFiniteLossError
from bcam_jax.workdir_lock import WorkdirError

USER_ERRORS = (
  ConfigError,
  DataError,
  WorkdirError,
  NoUsableCheckpointError,
  NoCheckpointError,
  NonFiniteLossError,
  WeightsError,
)
# absl's help flags: asking for help is no failure (`run_command` exits 0 after them).
HELP_FLAGS = ('--help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')

# Flags defined through define_config_flag belong to the command that calls it (its --help).
flags.disclaim_key_flags()


class _PackagedConfigParser(ConfigFileFlagParser):
  """ml_collections' config-file parser, first resolving a packaged name (configs.resolve),
  then preparing the config for the command line's overrides (`check_overrides`)."""

  def parse(self, path):
    """The config; a config that does not load (a syntax error, an unknown name or argument,
    an override of a field it lacks) ends the program with one `error: ...` line, where absl
    would print a traceback under "FATAL Flags parsing error"."""
    try:
      if path == WORKDIR_CONFIG:
        config = recorded_config(_flag_value(sys.argv, 'workdir'))
      else:
        config = super().parse(configs.resolve(path))
      if isinstance(config, ml_collections.ConfigDict):
        argv = flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False)
        check_overrides(config, self.name, argv)
    except SyntaxError as error:
      where = f'{error.filename}, line {error.lineno}'
      sys.exit(f'error: --{self.name}={path}: {where}: {error.msg}: {(error.text or "").strip()}')
    except (ValueError, TypeError, KeyError, ImportError, OSError) as error:
      given = '' if path == WORKDIR_CONFIG else f'--{self.name}={path}: '  # the user's words
      sys.exit(f'error: {given}{_last_line(error)}')
    return config


# The --config value meaning the config recorded in --workdir (what bcam-eval defaults to).
WORKDIR_CONFIG = '@workdir'


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of `--name=value` or `--name value` in `argv`, else None."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def recorded_config(workdir: str | None) -> ml_collections.ConfigDict:
  """The locked config recorded in `<workdir>/config.json`, the one the run was trained
  with; ValueError naming the file when there is none."""
  if not workdir:
    raise ValueError('no --workdir to read the recorded config.json from')
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(
      f"{path} does not exist: give --workdir a training run's workdir, or --config=<the "
      'config it was trained with>'
    )
  with open(path, encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.lock()
  return config


def _last_line(error: BaseException) -> str:
  """The message of `error`; for the errors ml_collections re-raises with the config's
  traceback in their text, that traceback's last line, the original message."""
  text = str(error).strip()
  if 'Traceback (most recent call last)' not in text:
    return text
  last = text.splitlines()[-1]
  return re.sub(r'^\w+(Error|Exception): ', '', last)


def check_overrides(config: ml_collections.ConfigDict, name: str, argv: list[str]) -> None:
  """Readies `config` for the `--<name>.<field>=value` overrides in `argv`.

  A model option the config leaves out (`--config.model.options.stem=imagenet` on a config
  whose options are empty) is added with the model's default, which gives ml_collections its
  type; an override of any other field the config lacks is a ValueError naming the field and
  listing the fields there, where ml_collections would raise a bare AttributeError.
  """
  pattern = re.compile(rf'--?(?:no)?{re.escape(name)}\.([^=]+)(?:=(.*))?')
  overrides = [match.groups() for match in map(pattern.fullmatch, argv) if match]
  model_name = dict(overrides).get('model.name') or config.get('model', {}).get('name')
  for override, _ in overrides:
    _check_override(config, name, override, model_name)


def _check_override(config, name: str, override: str, model_name: str | None) -> None:
  parts = config_path.split(override)
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or not isinstance(part, str):
      return  # a sequence index or a dataclass: ml_collections checks those itself
    if part not in node:
      if parts[:depth] == ('model', 'options') and depth == len(parts) - 1:
        defaults = models.model_option_defaults(model_name)
        if part in defaults:
          with node.unlocked():
            node[part] = defaults[part]
          return
        raise ValueError(
          f'--{name}.{override}: model {model_name!r} has no option {part!r}; its options: '
          + ', '.join(defaults)
        )
      raise ValueError(
        f'--{name}.{override}: {".".join([name, *parts[:depth]])} has no field {part!r}; '
        'its fields: ' + ', '.join(sorted(node))
      )
    node = node[part]


def define_config_flag(
  name: str, help_string: str, flag_values: flags.FlagValues = flags.FLAGS
) -> flags.FlagHolder:
  """A locked ml_collections config flag (`--<name>.field=value` overrides) whose value is a
  config file or a packaged config name, `<file or name>[:<get_config argument>]`."""
  holder = config_flags.DEFINE_config_file(
    name, None, help_string, flag_values=flag_values, lock_config=True
  )
  flag_values[name].parser = _PackagedConfigParser(name, lock_config=True)
  return holder


def run_main(main, argv) -> None:
  """Calls main(argv); a USER_ERRORS exception becomes `error: <message>` on stderr, and an
  interrupt (Ctrl-C, SIGINT) exits with status 130 as a shell reports it, never 0."""
  try:
    main(argv)
  except USER_ERRORS as error:
    sys.exit(f'error: {error}')
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)


def run_command(main: Callable, module: str) -> None:
  """Runs `main` of the command module `module` as the program, through absl and run_main.

  The program is a console script (`bcam-train`) or a clone's wrapper (`train.py`) that
  defines nothing itself, so the command's docstring and flags are made the program's own:
  that is what absl's `--help` shows.
  """
  sys.modules['__main__'].__doc__ = sys.modules[module].__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(module):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  try:
    app.run(lambda argv: run_main(main, argv))
  except SystemExit as exit_:
    # absl ends `--help` with status 1; asking for help is no failure.
    if exit_.code == 1 and any(arg in HELP_FLAGS for arg in sys.argv[1:]):
      sys.exit(0)
    raise
