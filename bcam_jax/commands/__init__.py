"""The command-line programs, one module each with `main` and `run` (its console script):
`train` (bcam-train), `eval` (bcam-eval), `reproduce` (bcam-reproduce), `data` (bcam-data)."""
