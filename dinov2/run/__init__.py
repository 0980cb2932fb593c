"""Launchers that submit the training, evaluation and curation entry points to SLURM through submitit.

``dinov2/run/train/train.py``, ``dinov2/run/eval/{knn,linear,log_regression}.py`` and
``dinov2/run/curation/curate.py`` take the SLURM arguments of
:func:`dinov2.run.submit.get_slurm_args_parser` plus the arguments of the entry point they wrap,
and run that entry point's ``main`` once per task: the same ``main`` that ``torchrun`` and a plain
``python`` call run. See docs/distributed.md.
"""
