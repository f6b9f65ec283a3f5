"""What the commands (bcam_jax/commands/) share: the `--config` flag, which also takes a
packaged config name, and running a command as the program. An error the user can act on (a
bad config field, unreadable data, a workdir in use or trained with another model, no usable
checkpoint, a diverged loss) ends the program with its one-paragraph message and exit
status 1, without a traceback; any other error keeps its traceback."""

import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from bcam_jax import configs
from bcam_jax.checkpointing import NoUsableCheckpointError
from bcam_jax.config_validation import ConfigError
from bcam_jax.data import DataError
from bcam_jax.train_lib import NonFiniteLossError
from bcam_jax.workdir_lock import WorkdirError

USER_ERRORS = (ConfigError, DataError, WorkdirError, NoUsableCheckpointError, NonFiniteLossError)

# Flags defined through define_config_flag belong to the command that calls it (its --help).
flags.disclaim_key_flags()


class _PackagedConfigParser(ConfigFileFlagParser):
  """ml_collections' config-file parser, first resolving a packaged name (configs.resolve)."""

  def parse(self, path):
    return super().parse(configs.resolve(path))


def define_config_flag(name: str, help_string: str) -> flags.FlagHolder:
  """A locked ml_collections config flag (`--<name>.field=value` overrides) whose value is a
  config file or a packaged config name, `<file or name>[:<get_config argument>]`."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
  flags.FLAGS[name].parser = _PackagedConfigParser(name, lock_config=True)
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
  app.run(lambda argv: run_main(main, argv))
