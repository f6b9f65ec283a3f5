"""Experiment grids for reproduce.py (each defines get_config())."""
