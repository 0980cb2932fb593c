"""Evaluation behaviour that a line-coverage pass of the suite found unexercised: k-NN's refusal of
both sharding modes at once and of the faiss backend without faiss, a linear head asked for more
blocks than the features hold, an unknown selection metric, ``--n-last-blocks`` outside the
backbone's depth, a model whose output is not per-image features, the extraction's progress bar,
logistic regression's non-positive C and a split with nothing to hold out, a training checkpoint
without a teacher backbone, and PCA colours of a single patch and a figure of no images."""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import pytest
import torch
from eval_micro import micro_vit
from test_feature_extraction import IndexImages
from torch import nn

from dinov2.eval import linear
from dinov2.eval.features import extract_features
from dinov2.eval.knn import knn_classify
from dinov2.eval.linear_heads import LinearHead, best_classifier


def _problem():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=gen), torch.tensor([0, 1, 0, 1, 0, 1]), torch.randn(3, 4, generator=gen)


def test_knn_refuses_sharding_queries_and_training_features_at_once():
    train, labels, test = _problem()
    with pytest.raises(ValueError, match="shard_queries and shard_train are alternatives: pass one"):
        knn_classify(train, labels, test, torch.zeros(3, dtype=torch.long), nb_knn=(1,),
                     shard_queries=True, shard_train=True)  # fmt: skip


def test_the_faiss_backend_without_faiss_says_how_to_install_it(monkeypatch):
    train, labels, test = _problem()
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
    with pytest.raises(ImportError, match=r"backend='faiss' needs faiss \(pip install faiss-cpu\)"):
        knn_classify(train, labels, test, torch.zeros(3, dtype=torch.long), nb_knn=(1,), backend="faiss")


def test_a_head_over_more_blocks_than_the_features_hold_is_refused_by_count():
    head = LinearHead(n_blocks=3, use_avgpool=False, embed_dim=4, num_classes=2)
    packed = torch.zeros(5, 2 + 1, 4)  # CLS of 2 blocks, then the avgpool slot
    with pytest.raises(ValueError, match="classifier needs 3 blocks, features have 2"):
        head(packed)
    assert LinearHead(2, True, 4, 2)(packed).shape == (5, 2)  # as many as they hold: fine


def test_the_best_classifier_by_an_unknown_metric_is_refused():
    results = {"a": {"top1": 1.0, "top5": 2.0}}
    with pytest.raises(ValueError, match="unknown metric 'top3'; choose from"):
        best_classifier(results, "top3")


@pytest.mark.parametrize("blocks", [[0], [1, 3]])
def test_n_last_blocks_outside_the_backbone_s_depth_is_refused_before_any_head_is_built(blocks):
    backbone = micro_vit()  # depth 2
    args = SimpleNamespace(n_last_blocks=blocks, batch_size=8, learning_rates=[0.1], avgpool=[False])
    with pytest.raises(ValueError, match=re.escape(f"--n-last-blocks {blocks} must lie in [1, 2] for this backbone")):
        linear._grid(args, backbone, num_classes=3)


class _Tokens(nn.Module):
    """A model that returns every token, ``(batch, tokens, dim)``: not per-image features."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(2).transpose(1, 2)


def test_a_model_returning_token_maps_is_refused_by_what_it_must_return():
    with pytest.raises(TypeError, match=r"must return \(batch, dim\) features or a dict with 'x_norm_clstoken'"):
        extract_features(_Tokens(), IndexImages(4), batch_size=2, progress=False)


class _Mean(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def test_extraction_with_progress_draws_a_bar_that_reaches_the_dataset_size(capsys):
    features, labels = extract_features(_Mean(), IndexImages(6), batch_size=4, progress=True)
    assert features[:, 0].tolist() == [float(i) for i in range(6)]
    bar = capsys.readouterr().err
    assert "100%" in bar and "6.00/6.00" in bar and "img/s" in bar
    extract_features(_Mean(), IndexImages(6), batch_size=4, progress=False)
    assert "100%" not in capsys.readouterr().err


def test_logistic_regression_refuses_a_non_positive_c_and_a_split_with_nothing_to_hold_out():
    from dinov2.eval.log_regression import fit_logistic_regression, stratified_split

    with pytest.raises(ValueError, match="C must be positive, got 0"):
        fit_logistic_regression(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), 0.0, num_classes=2)
    with pytest.raises(ValueError, match="no class has two samples: cannot hold any out to choose C"):
        stratified_split(torch.tensor([0, 1, 2]), holdout_fraction=0.5)
    fit, holdout = stratified_split(torch.tensor([0, 0, 1]), holdout_fraction=0.5)  # class 0 can spare one
    assert len(holdout) == 1 and sorted(torch.cat((fit, holdout)).tolist()) == [0, 1, 2]


def test_a_training_checkpoint_without_a_teacher_backbone_is_refused_by_name(tmp_path):
    from dinov2.checkpoint.sharded import save_checkpoint
    from dinov2.eval.setup import read_pretrained_weights

    model = nn.ModuleDict({"student": nn.ModuleDict({"backbone": nn.Linear(2, 2)})})  # no teacher
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, {"iteration": 1}, {})
    with pytest.raises(ValueError, match=f"training checkpoint {step} holds no teacher backbone"):
        read_pretrained_weights(tmp_path)


def test_pca_colours_need_two_patches_and_a_figure_needs_an_image():
    from dinov2.eval.pca import foreground_mask, foreground_rgb, pca_figure

    one_patch = torch.randn(1, 1, 1, 8)
    assert foreground_mask(one_patch).tolist() == [[[False]]]  # no component to fit: all background
    features = torch.randn(1, 2, 2, 8)
    lone = torch.tensor([[[True, False], [False, False]]])
    assert torch.equal(foreground_rgb(features, lone), torch.zeros(1, 2, 2, 3))  # black, not NaN
    with pytest.raises(ValueError, match="need at least one image"):
        pca_figure(_Mean(), [], image_size=16)
