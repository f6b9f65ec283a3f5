"""train.py that sends itself a signal at a chosen moment, for the crash-recovery tests.

  python tests/kill_at.py MOMENT STEP SIGNAL [train.py flags...]

MOMENT is where the signal goes off (STEP picks the occurrence where it has one):
  startup          before the latest checkpoint is looked for (config and prototypes written)
  validation       as the validation after step STEP begins
  save             just after the train state of step STEP is handed to Orbax (being written)
  save_best        just after the best checkpoint of step STEP is handed to Orbax
  after_validation once the best checkpoint of step STEP is on disk, before that step's train
                   state (a best checkpoint newer than the latest train state)
SIGNAL is a name of the signal module, e.g. SIGKILL or SIGINT (Ctrl-C).
Nothing of the library is changed: the moments are wrapped from here.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

from bcam_jax import cli, split_loop  # noqa: E402
from bcam_jax.checkpointing import Checkpoints  # noqa: E402
from bcam_jax.commands import train  # noqa: E402  (train.py's command: its flags and main)

MOMENTS = ('startup', 'validation', 'save', 'save_best', 'after_validation')


def main():
  moment, step, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  if moment not in MOMENTS:
    raise SystemExit(f'unknown moment {moment!r}; valid: {MOMENTS}')
  signum = getattr(signal, name)
  fire = lambda: os.kill(os.getpid(), signum)
  # A process started in the background by a non-interactive shell (`cmd &`, as CI
  # runners and `nohup` do) inherits SIGINT ignored, and Python then installs no
  # KeyboardInterrupt handler; Ctrl-C at a terminal reaches a process that has one.
  if signum == signal.SIGINT:
    signal.signal(signal.SIGINT, signal.default_int_handler)

  if moment == 'startup':
    restore = Checkpoints.restore_latest

    def restore_latest(self, abstract_state):
      fire()
      return restore(self, abstract_state)

    Checkpoints.restore_latest = restore_latest

  elif moment == 'validation':
    evaluate = split_loop.evaluate_split
    seen = {'n': 0}  # validations so far: the run validates every eval_every_steps

    def evaluate_then_fire(run, eval_step, variables, split, prototypes):
      if split is run.datasets.val:
        seen['n'] += 1
        if seen['n'] * run.spec.train.eval_every_steps == step:
          fire()
      return evaluate(run, eval_step, variables, split, prototypes)

    split_loop.evaluate_split = evaluate_then_fire

  else:
    method = 'save' if moment == 'save' else 'save_best'
    original = getattr(Checkpoints, method)

    def save_then_fire(self, s, *args, **kwargs):
      original(self, s, *args, **kwargs)
      if s == step:
        if moment == 'after_validation':
          self.best.wait_until_finished()
        fire()

    setattr(Checkpoints, method, save_then_fire)

  sys.argv = [sys.argv[0]] + sys.argv[4:]
  app.run(lambda argv: cli.run_main(train.main, argv))


if __name__ == '__main__':
  main()
