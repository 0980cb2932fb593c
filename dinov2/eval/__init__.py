"""Evaluation of frozen backbones: k-NN, logistic regression, linear probing, online k-NN, PCA.

Entry points are scripts (``python dinov2/eval/knn.py --help``); shared pieces live in
:mod:`~dinov2.eval.setup` (arguments, model), :mod:`~dinov2.eval.features` (extraction) and
:mod:`~dinov2.eval.metrics` (accuracy, result files). Nothing is imported eagerly here.
"""
