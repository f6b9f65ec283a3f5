"""`python train.py` in a clone: the `bcam-train` command (bcam_jax/commands/train.py)."""

from bcam_jax.commands import train

if __name__ == '__main__':
  train.run()
