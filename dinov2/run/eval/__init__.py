"""SLURM launchers for the evaluations: ``knn.py``, ``linear.py``, ``log_regression.py``."""
