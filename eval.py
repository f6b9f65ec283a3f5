"""`python eval.py` in a clone: the `bcam-eval` command (bcam_jax/commands/eval.py)."""

from bcam_jax.commands import eval

if __name__ == '__main__':
  eval.run()
