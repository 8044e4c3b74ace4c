"""A training batch on a CPU goes through in passes (Runtime.train_chunk): the optimizer step is
the one the whole batch gives, and batches go through whole where passes would change the step
(BatchNorm in train mode) or do not help (CUDA)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config.schema import TrainConfig
from pipeline.engine.backbones import freeze_batchnorm_stats
from pipeline.engine.fit import CPU_PASS_PIXELS, Runtime, Stepper, run_batches


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def _runtime(device: str = "cpu") -> Runtime:
    return Runtime(torch.device(device), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))


SIDE = 96  # CPU_PASS_PIXELS / 96^2 = 64 images a pass: a batch of 80 goes in 64 + 16
BATCH = 80


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: bool, accum: int = 1) -> nn.Module:
    rt, tcfg = _runtime(), TrainConfig(grad_accum=accum, grad_clip=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stepper = Stepper(optimizer, None, rt, tcfg, model.parameters())
    loss_fn = nn.functional.cross_entropy

    def step(batch):
        xb, yb = batch
        chunk = rt.train_chunk(model, xb) if passes else None
        if chunk is None:
            return loss_fn(model(xb), yb), len(xb)
        pairs = zip(xb.split(chunk), yb.split(chunk))
        return ((loss_fn(model(xs), ys), len(xs), len(xs) / len(xb)) for xs, ys in pairs)

    batches = [(x, y), (x.flip(0), y.flip(0))]
    run_batches(batches, step, stepper, len(batches), "test", progress=False)
    return model


@pytest.mark.parametrize("accum", [1, 2])
def test_passes_give_the_whole_batchs_step_when_batchnorm_is_frozen(accum):
    x, y = torch.randn(BATCH, 3, SIDE, SIDE), torch.randint(0, 3, (BATCH,))
    whole, split = _model(), _model()
    for m in (whole, split):
        m.train()
        freeze_batchnorm_stats(m)
    assert _runtime().train_chunk(split, x) == CPU_PASS_PIXELS // SIDE ** 2 == 64
    _step(whole, x, y, passes=False, accum=accum)
    _step(split, x, y, passes=True, accum=accum)
    for a, b in zip(whole.parameters(), split.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    assert not torch.equal(next(whole.parameters()), next(_model().parameters()))  # it did step


def test_batchnorm_in_train_mode_cuda_or_a_small_batch_go_through_whole(monkeypatch):
    x = torch.randn(BATCH, 3, SIDE, SIDE)
    model = _model().train()
    assert _runtime().train_chunk(model, x) is None  # batch statistics: passes would change them
    freeze_batchnorm_stats(model)
    assert _runtime().train_chunk(model, x[:64]) is None  # fits one pass
    assert _runtime().train_chunk(model, x) == 64
    monkeypatch.setattr(Runtime, "cuda", property(lambda self: True))
    assert _runtime().train_chunk(model, x) is None


def test_the_recorded_batch_loss_is_the_whole_batchs(monkeypatch):
    from types import SimpleNamespace

    from pipeline.training import phases

    model = _model().train()
    freeze_batchnorm_stats(model)
    x, y = torch.randint(0, 256, (BATCH, 3, SIDE, SIDE), dtype=torch.uint8), torch.randint(0, 3, (BATCH,))
    trainer = SimpleNamespace(rt=_runtime(), model=model, loss_fn=nn.functional.cross_entropy, batch_losses=[])
    parts = list(phases.model_loss(trainer, model, (x, y), None))
    assert [(n, share) for _, n, share in parts] == [(64, 0.8), (16, 0.2)]
    whole = nn.functional.cross_entropy(model(trainer.rt.images(x)), y)
    assert trainer.batch_losses == [pytest.approx(float(whole.detach()), rel=1e-5)]
