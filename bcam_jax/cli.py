"""What the entry points (train.py, eval.py) share: an error the user can act on (a bad
config field, unreadable data, a workdir in use or trained with another model, no usable
checkpoint, a diverged loss) ends the program with its one-paragraph message and exit
status 1, without a traceback; any other error keeps its traceback."""

import sys

from bcam_jax.checkpointing import NoUsableCheckpointError
from bcam_jax.config_validation import ConfigError
from bcam_jax.data import DataError
from bcam_jax.train_lib import NonFiniteLossError
from bcam_jax.workdir_lock import WorkdirError

USER_ERRORS = (ConfigError, DataError, WorkdirError, NoUsableCheckpointError, NonFiniteLossError)


def run_main(main, argv) -> None:
  """Calls main(argv); a USER_ERRORS exception becomes `error: <message>` on stderr."""
  try:
    main(argv)
  except USER_ERRORS as error:
    sys.exit(f'error: {error}')
