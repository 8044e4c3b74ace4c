"""Linear probe on cached features: the "LP" of LP-FT (Kumar et al., ICLR 2022).

Fits the head to convergence with full-batch L-BFGS (``torch.optim.LBFGS``) on the frozen
backbone's pooled features, minimising the pipeline's own training loss plus an L2 penalty whose
strength is chosen on the fold's validation rows. Fine-tuning then starts from a converged head,
which distorts the pretrained features less than unfreezing after a briefly trained head. On
cached features each fit is a few hundred small matrix products: well under a second.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pipeline.tasks import TaskSpec

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2)


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


def fit_linear_probe(spec: TaskSpec, metric, loss_fn: Callable, train_x: torch.Tensor, train_y: torch.Tensor,
                     valid_x: torch.Tensor, valid_y: np.ndarray, max_iter: int = 200):
    """Head weight, bias, the chosen L2 strength and its validation score."""
    best = None
    for l2 in L2_GRID:
        weight, bias = _fit(loss_fn, train_x.float(), train_y, spec.num_outputs, l2, max_iter)
        logits = (valid_x.float() @ weight.T + bias).cpu().numpy()
        value = metric(valid_y, spec.activate(logits), spec.task)
        if best is None or metric.better(value, best[3]):
            best = (weight, bias, l2, value)
    return best
