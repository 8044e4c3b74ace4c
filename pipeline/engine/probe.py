"""Linear probe on cached features: the "LP" of LP-FT (Kumar et al., ICLR 2022).

Fits the head to convergence with full-batch L-BFGS (``torch.optim.LBFGS``) on the frozen
backbone's pooled features, minimising the pipeline's own training loss plus an L2 penalty whose
strength is chosen by an inner split of the fold's training rows. Fine-tuning then starts from a
converged head, which distorts the pretrained features less than unfreezing after a briefly
trained head. On cached features each fit is a few hundred small matrix products.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pipeline.domain.tasks import TaskSpec

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _fit(loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, outputs: int, l2: float, max_iter: int):
    weight = torch.zeros(outputs, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(outputs, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_linear_probe(spec: TaskSpec, loss_fn: Callable, train_x: torch.Tensor, train_y: torch.Tensor,
                     seed: int = 0, inner_folds: int = 3, max_iter: int = 200):
    """Head weight, bias and the chosen L2 strength.

    The strength is the one with the lowest held-out *loss* in an inner ``inner_folds``-fold split
    of the training rows, so the fold's validation rows stay untouched (a probe chosen on them would
    make the CV optimistic) and the choice favours a calibrated head over an overconfident one: a
    head with huge weights amplifies every small feature change once the backbone trains."""
    x, n = train_x.float(), len(train_x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    parts = [order[k::inner_folds] for k in range(inner_folds)]
    losses = []
    for l2 in L2_GRID:
        total = 0.0
        for k, held in enumerate(parts):
            fit_rows = torch.cat([p for j, p in enumerate(parts) if j != k])
            weight, bias = _fit(loss_fn, x[fit_rows], train_y[fit_rows], spec.num_outputs, l2, max_iter)
            with torch.no_grad():
                total += float(loss_fn(x[held] @ weight.T + bias, train_y[held])) * len(held)
        losses.append(total / n)
    l2 = L2_GRID[int(np.argmin(losses))]
    weight, bias = _fit(loss_fn, x, train_y, spec.num_outputs, l2, max_iter)
    return weight, bias, l2
