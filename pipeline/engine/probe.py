"""Linear probe on cached features: the "LP" of LP-FT (Kumar et al., ICLR 2022).

Fits the head to convergence with full-batch L-BFGS (``torch.optim.LBFGS``) on the frozen
backbone's pooled features, minimising the pipeline's own training loss plus an L2 penalty whose
strength is chosen by an inner split of the fold's training rows. Fine-tuning then starts from a
converged head, which distorts the pretrained features less than unfreezing after a briefly
trained head.

The L2 search walks each inner split's regularisation path from the strongest penalty down, each
fit starting from the previous one's head, and the final head on all training rows starts from
the mean of the chosen strength's inner heads. The fits stop when a step changes the loss by less
than ``TOLERANCE_CHANGE``: far below what separates two strengths of the grid, and the fits are
small enough that the number of L-BFGS steps, not arithmetic, is what they cost
(BENCHMARKS.md, speed: the frozen-only stage against a bare forward pass).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pipeline.domain.tasks import TaskSpec

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TOLERANCE_GRAD, TOLERANCE_CHANGE = 1e-5, 1e-6  # L-BFGS's stopping rules (its defaults: 1e-7, 1e-9)


def _fit(loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, outputs: int, l2: float, max_iter: int,
         start: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One penalised fit. It runs on centred features (``x - mean``): the bias is not penalised, so
    this is the same problem with the same optimum, but pooled activations have large positive
    means that couple the bias to every weight, and removing them cut L-BFGS's evaluations about
    in half on the digits' features (BENCHMARKS.md, speed)."""
    mean = x.mean(0)
    x = x - mean
    if start is None:
        weight = torch.zeros(outputs, x.shape[1], device=x.device)
        bias = torch.zeros(outputs, device=x.device)
    else:
        weight, bias = start[0].clone(), start[1] + start[0] @ mean
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=TOLERANCE_GRAD, tolerance_change=TOLERANCE_CHANGE,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight = weight.detach()
    return weight, bias.detach() - weight @ mean


def fit_linear_probe(spec: TaskSpec, loss_fn: Callable, train_x: torch.Tensor | list[torch.Tensor],
                     train_y: torch.Tensor, seed: int = 0, inner_folds: int = 3, max_iter: int = 200):
    """Head weight, bias and the chosen L2 strength.

    ``train_x``: the features of the training rows, or a list of them under several views of the
    same images (flips, ...), aligned row by row: the head then trains on every view, and the
    inner split keeps all views of an image on one side of it.

    The strength is the one with the lowest held-out *loss* in an inner ``inner_folds``-fold split
    of the training rows, so the fold's validation rows stay untouched (a probe chosen on them would
    make the CV optimistic) and the choice favours a calibrated head over an overconfident one: a
    head with huge weights amplifies every small feature change once the backbone trains."""
    views = [v.float() for v in (train_x if isinstance(train_x, (list, tuple)) else [train_x])]
    n, outputs = len(views[0]), spec.num_outputs
    x, y = torch.cat(views), torch.cat([train_y] * len(views))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    every_view = lambda idx: torch.cat([idx + v * n for v in range(len(views))])  # noqa: E731
    images = [order[k::inner_folds] for k in range(inner_folds)]
    losses, heads = np.zeros(len(L2_GRID)), {}
    for k, held_images in enumerate(images):
        held = every_view(held_images)
        fit_rows = every_view(torch.cat([p for j, p in enumerate(images) if j != k]))
        start = None
        for i in reversed(range(len(L2_GRID))):  # the strongest penalty first: each fit warm-starts the next
            start = heads[i, k] = _fit(loss_fn, x[fit_rows], y[fit_rows], outputs, L2_GRID[i], max_iter, start)
            with torch.no_grad():
                losses[i] += float(loss_fn(x[held] @ start[0].T + start[1], y[held])) * len(held)
    best = int(np.argmin(losses))
    start = tuple(torch.stack([heads[best, k][j] for k in range(inner_folds)]).mean(0) for j in (0, 1))
    weight, bias = _fit(loss_fn, x, y, outputs, L2_GRID[best], max_iter, start)
    return weight, bias, L2_GRID[best]
