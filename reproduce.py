"""`python reproduce.py` in a clone: the `bcam-reproduce` command (bcam_jax/commands/)."""

from bcam_jax.commands import reproduce

if __name__ == '__main__':
  reproduce.run()
