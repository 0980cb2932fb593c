"""SLURM launcher for pretraining: ``train.py``."""
