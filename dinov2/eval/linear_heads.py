"""The linear-probing core: a grid of independent linear classifiers on shared frozen features.

Features arrive *packed*: a (B, n_max + 1, D) tensor holding the normalised CLS tokens of the last
``n_max`` blocks in block order, then the average of the last block's patch tokens. A classifier
with ``n_blocks`` and ``use_avgpool`` reads ``[cls_{L-n+1}, ..., cls_L, (avgpool)]`` from it, the
input layout of the hub ``_lc`` heads (:mod:`dinov2.hub.classifiers`).

Every classifier is its own ``nn.Linear`` in an ``nn.ModuleDict`` and its own SGD parameter group;
the summed loss gives each one exactly the gradient of its own loss, so classifiers never interact.
Nothing here needs images: the training loop takes any iterator of (packed features, labels).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinov2 import distributed
from dinov2.eval.metrics import topk_hits

logger = logging.getLogger("dinov2")

DEFAULT_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
METRIC_TYPES = ("top1", "top5", "mean_per_class")


@torch.no_grad()
def pack_features(backbone: nn.Module, images: torch.Tensor, n_max: int) -> torch.Tensor:
    """Packed (B, n_max + 1, D) features of ``images``: CLS of the last ``n_max`` blocks, then avgpool."""
    outputs = backbone.get_intermediate_layers(images, n=n_max, return_class_token=True, norm=True)
    class_tokens = torch.stack([cls for _, cls in outputs], dim=1)
    return torch.cat([class_tokens, outputs[-1][0].mean(dim=1, keepdim=True)], dim=1)


def classifier_name(n_blocks: int, use_avgpool: bool, base_lr: float) -> str:
    return f"classifier_{n_blocks}_blocks_avgpool_{use_avgpool}_lr_{base_lr:g}".replace(".", "_")


class LinearHead(nn.Module):
    """``nn.Linear`` on ``[cls of the last n_blocks blocks, (avgpool)]`` taken from packed features."""

    def __init__(self, n_blocks: int, use_avgpool: bool, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.n_blocks, self.use_avgpool, self.embed_dim = int(n_blocks), bool(use_avgpool), int(embed_dim)
        self.linear = nn.Linear((self.n_blocks + self.use_avgpool) * self.embed_dim, num_classes)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.linear.weight.normal_(0.0, 0.01, generator=generator)
            self.linear.bias.zero_()

    def inputs(self, packed: torch.Tensor) -> torch.Tensor:
        n_max = packed.shape[1] - 1
        if self.n_blocks > n_max:
            raise ValueError(f"classifier needs {self.n_blocks} blocks, features have {n_max}")
        parts = packed[:, n_max - self.n_blocks : n_max + 1 if self.use_avgpool else n_max]
        return parts.reshape(packed.shape[0], -1)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.linear(self.inputs(packed))

    def hub_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"weight", "bias"}`` for the hub ``_lc`` layout, which always has the avgpool slot
        (zero weights there when this classifier does not use it)."""
        weight = self.linear.weight.detach().float().cpu()
        if not self.use_avgpool:
            weight = torch.cat([weight, weight.new_zeros(weight.shape[0], self.embed_dim)], dim=1)
        return {"weight": weight.contiguous(), "bias": self.linear.bias.detach().float().cpu().clone()}


def build_heads(
    embed_dim: int,
    num_classes: int,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    n_last_blocks: Sequence[int] = (1, 4),
    avgpool: Sequence[bool] = (False, True),
    seed: int = 0,
) -> tuple[nn.ModuleDict, dict[str, float]]:
    """The classifier grid and each classifier's base (unscaled) learning rate, by name.

    Classifiers sharing ``(n_blocks, use_avgpool)`` start from the same weights (normal, std 0.01,
    seeded by ``(seed, n_blocks, use_avgpool)``; bias 0), so they differ only by their learning rate.
    """
    heads, base_lrs = nn.ModuleDict(), {}
    for n_blocks, use_avgpool, lr in itertools.product(n_last_blocks, avgpool, dict.fromkeys(learning_rates)):
        name = classifier_name(n_blocks, use_avgpool, lr)
        head = LinearHead(n_blocks, use_avgpool, embed_dim, num_classes)
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + 2 * int(n_blocks) + int(use_avgpool))
        head.reset_parameters(generator)
        heads[name], base_lrs[name] = head, float(lr)
    return heads, base_lrs


def make_optimizer(heads: nn.ModuleDict, learning_rates: dict[str, float]) -> torch.optim.SGD:
    """SGD (momentum 0.9, no weight decay), one parameter group per classifier at its learning rate."""
    groups = [
        {"params": list(head.parameters()), "lr": learning_rates[name], "initial_lr": learning_rates[name]}
        for name, head in heads.items()
    ]
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=0.0)


def cosine_factor(iteration: int, max_iter: int) -> float:
    """Cosine decay from 1 at iteration 0 towards 0 at ``max_iter``."""
    return 0.5 * (1.0 + math.cos(math.pi * iteration / max(max_iter, 1)))


def average_gradients(module: nn.Module) -> None:
    """All-reduce (mean) every gradient across ranks; a no-op on one process."""
    world = distributed.get_world_size()
    if world == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    handles = [distributed.all_reduce(g, async_op=True) for g in grads]
    for handle, grad in zip(handles, grads):
        handle.wait()
        grad.div_(world)


def train_step(
    heads: nn.ModuleDict, optimizer: torch.optim.Optimizer, packed: torch.Tensor, labels: torch.Tensor, lr_factor: float
) -> float:
    """One SGD step of every classifier on one batch; returns the mean of their losses."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor
    losses = [F.cross_entropy(head(packed), labels) for head in heads.values()]
    loss = torch.stack(losses).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(heads)
    optimizer.step()
    return loss.item() / len(losses)


def train_heads(
    heads: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_iter: int,
    start_iter: int = 0,
    on_iteration_end: Callable[[int], None] | None = None,
    log_period: int = 50,
) -> None:
    """Iterations ``start_iter .. max_iter - 1`` with the cosine schedule; ``batches`` must yield the
    batches of those iterations in order. ``on_iteration_end(done)`` runs after each step (checkpoints,
    evaluation)."""
    heads.train()
    iterator: Iterator = iter(batches)
    for iteration in range(start_iter, max_iter):
        packed, labels = next(iterator)
        loss = train_step(heads, optimizer, packed.float(), labels, cosine_factor(iteration, max_iter))
        if (iteration + 1) % log_period == 0 or iteration + 1 == max_iter:
            logger.info("linear [%d/%d] mean loss %.4f, lr factor %.4f", iteration + 1, max_iter, loss,
                        cosine_factor(iteration, max_iter))  # fmt: skip
        if on_iteration_end is not None:
            on_iteration_end(iteration + 1)


def _shard(n: int) -> slice:
    world, rank = distributed.get_world_size(), distributed.get_rank()
    per_rank = -(-n // world)
    return slice(min(rank * per_rank, n), min((rank + 1) * per_rank, n))


@torch.no_grad()
def evaluate_heads(
    heads: nn.ModuleDict, packed: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int = 1024
) -> dict[str, dict[str, float]]:
    """Top-1, top-5 and mean per-class accuracy (percent) of every classifier on packed features,
    all under the top-k convention of :mod:`dinov2.eval.metrics` (ties to the lower class index,
    NaN never correct).

    Every rank holds all rows and scores its share; counts are summed across ranks.
    """
    device = next(heads.parameters()).device
    rows = _shard(len(labels))
    names = list(heads.keys())
    counts = torch.zeros(len(names), 2 + num_classes, dtype=torch.float64, device=device)
    for start in range(rows.start, rows.stop, batch_size):
        x = packed[start : min(start + batch_size, rows.stop)].to(device).float()
        y = labels[start : start + x.shape[0]].to(device)
        for row, head in enumerate(heads.values()):
            hits = topk_hits(head(x), y, ks=(1, 5))
            counts[row, 0] += hits[1].sum()
            counts[row, 1] += hits[5].sum()
            counts[row, 2:] += torch.bincount(y[hits[1]], minlength=num_classes).double()
    distributed.all_reduce(counts)
    per_class_total = torch.bincount(labels.cpu().long(), minlength=num_classes).double()
    present = per_class_total > 0
    results = {}
    for row, name in enumerate(names):
        c = counts[row].cpu()
        per_class = c[2:][present] / per_class_total[present]
        results[name] = {
            "top1": 100.0 * float(c[0]) / len(labels),
            "top5": 100.0 * float(c[1]) / len(labels),
            "mean_per_class": 100.0 * float(per_class.mean()),
        }
    return results


def best_classifier(results: dict[str, dict[str, float]], metric: str = "top1") -> str:
    """The name with the highest ``metric`` (the first in grid order on ties)."""
    if metric not in METRIC_TYPES:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRIC_TYPES}")
    return max(results, key=lambda name: results[name][metric])


def checkpoint_state(heads: nn.ModuleDict, optimizer: torch.optim.Optimizer, iteration: int, **extra) -> dict:
    return {"heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "iteration": int(iteration),
            "names": list(heads.keys()), **extra}  # fmt: skip


def load_checkpoint(path: str | os.PathLike, heads: nn.ModuleDict, optimizer: torch.optim.Optimizer) -> dict:
    """Restore ``heads`` and ``optimizer`` from a checkpoint written by :func:`checkpoint_state`
    (loaded with ``weights_only=True``); returns the whole checkpoint dict."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("names") != list(heads.keys()):
        raise ValueError(
            f"checkpoint {path} holds classifiers {state.get('names')}, this run has {list(heads.keys())}; "
            "use the same grid or --no-resume"
        )
    heads.load_state_dict(state["heads"])
    optimizer.load_state_dict(state["optimizer"])
    return state
