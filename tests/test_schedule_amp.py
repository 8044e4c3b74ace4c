"""The training run does what docs/training.md says: the LR schedule reaches ``lr x min_lr_ratio`` at a
phase's last update, AMP picks bf16 only where the GPU has it natively, the GradScaler survives a
resume, ``train.compile``/``train.deterministic`` act, and the EMA follows a short run.

CPU only: CUDA capabilities are mocked, ``torch.compile`` is replaced by fakes.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config.schema import PhaseConfig, TrainConfig, config_from_dict
from pipeline.core.errors import PipelineError
from pipeline.engine import checkpoints, fit
from pipeline.engine.fit import Runtime, Stepper, build_scheduler, choose_amp_dtype
from pipeline.training.phases import make_ema

LR, MIN = 1e-2, 0.01


# ---------------------------------------------------------------------------- LR schedule


def _optimizer(lr: float = LR) -> torch.optim.Optimizer:
    """Two groups like the unfrozen phase's: head (lr_scale 1) and backbone (lr_scale 0.1)."""
    head, body = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [head], "lr_scale": 1.0}, {"params": [body], "lr_scale": 0.1}], lr=lr)


def lr_trace(phase: PhaseConfig, updates_per_epoch: int, start_update: int = 0) -> list[tuple[float, float]]:
    """(head, backbone) LR that the optimizer actually uses at every update from ``start_update``,
    driven the way train.py drives it: build, ``step_update(stepper.updates)``, then the Stepper."""
    optimizer = _optimizer(phase.lr)
    scheduler = build_scheduler(optimizer, phase, updates_per_epoch)
    used = []
    optimizer.register_step_pre_hook(lambda opt, *_: used.append(tuple(g["lr"] for g in opt.param_groups)))
    rt = Runtime(torch.device("cpu"), torch.zeros(1), torch.ones(1))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    stepper = Stepper(optimizer, scheduler, rt, TrainConfig(), params, steps_per_epoch=updates_per_epoch,
                      start_update=start_update)
    scheduler.step_update(stepper.updates)
    for _ in range(start_update, phase.epochs * updates_per_epoch):
        stepper.backward(sum(p.sum() for p in params) * 0 + torch.ones(()), last=True)
    return used


@pytest.mark.parametrize("epochs, per_epoch, warmup", [(2, 5, 0.5), (1, 3, 0.0), (1, 3, 0.5), (3, 4, 0.0),
                                                        (3, 7, 1.25)])
def test_every_phase_ends_at_lr_times_min_lr_ratio(epochs, per_epoch, warmup):
    phase = PhaseConfig(epochs=epochs, lr=LR, warmup_epochs=warmup, min_lr_ratio=MIN)
    trace = lr_trace(phase, per_epoch)
    head = [h for h, _ in trace]
    assert len(trace) == epochs * per_epoch
    assert head[-1] == pytest.approx(LR * MIN)  # the last update runs at the end of the cosine
    assert max(head) == pytest.approx(LR)  # the peak is reached
    assert head[0] == pytest.approx(LR * MIN if warmup else LR)  # warmup starts at lr x min_lr_ratio
    peak = head.index(max(head))
    assert all(a < b for a, b in zip(head[:peak], head[1:peak + 1]))  # warmup rises
    assert all(a > b for a, b in zip(head[peak:], head[peak + 1:]))  # cosine falls
    assert all(b == pytest.approx(0.1 * h) for h, b in trace)  # group lr_scale kept throughout


def test_half_epoch_warmup_trace_of_a_two_epoch_phase():
    phase = PhaseConfig(epochs=2, lr=LR, warmup_epochs=0.5, min_lr_ratio=MIN)
    head = [h for h, _ in lr_trace(phase, 5)]
    # 3 warmup updates (2.5 rounded), peak at update 3, cosine over updates 3..9
    assert head[:4] == pytest.approx([LR * MIN, LR * (MIN + (1 - MIN) / 3), LR * (MIN + 2 * (1 - MIN) / 3), LR])
    middle = LR * (MIN + (1 - MIN) * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert head[6] == pytest.approx(middle)


@pytest.mark.parametrize("start", [1, 3, 5, 7])
def test_a_resumed_stepper_follows_the_same_schedule(start):
    phase = PhaseConfig(epochs=2, lr=LR, warmup_epochs=0.5, min_lr_ratio=MIN)
    assert lr_trace(phase, 5, start_update=start) == lr_trace(phase, 5)[start:]  # a pure function of the update


def test_a_single_update_phase_runs_at_the_peak():
    assert lr_trace(PhaseConfig(epochs=1, lr=LR, warmup_epochs=0.5, min_lr_ratio=MIN), 1) == [(LR, 0.1 * LR)]


def test_tune_budgets_get_the_same_shape_over_fewer_epochs():
    short = lr_trace(PhaseConfig(epochs=1, lr=LR, warmup_epochs=0.0, min_lr_ratio=MIN), 6)
    long = lr_trace(PhaseConfig(epochs=3, lr=LR, warmup_epochs=0.0, min_lr_ratio=MIN), 2)
    assert short == long  # same number of updates: same trace


# ---------------------------------------------------------------------------- AMP


@pytest.mark.parametrize("capability, setting, expected", [
    ((7, 5), "auto", torch.float16),  # T4: bf16 only emulated
    ((7, 0), "auto", torch.float16),  # V100
    ((6, 0), "auto", torch.float16),  # P100
    ((8, 0), "auto", torch.bfloat16),  # A100
    ((8, 9), "auto", torch.bfloat16),  # L4
    ((9, 0), "auto", torch.bfloat16),  # H100
    ((9, 0), "fp16", torch.float16),
    ((7, 5), "bf16", torch.bfloat16),
])
def test_amp_picks_bf16_only_on_native_hardware(monkeypatch, capability, setting, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # true even where emulated
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    tcfg = TrainConfig(amp_dtype=setting)
    assert choose_amp_dtype(tcfg, torch.device("cuda")) == expected
    assert choose_amp_dtype(tcfg, torch.device("cpu")) is None
    assert choose_amp_dtype(TrainConfig(amp=False, amp_dtype=setting), torch.device("cuda")) is None


def test_amp_dtype_is_validated():
    with pytest.raises(PipelineError, match="train.amp_dtype.*valid: auto, bf16, fp16"):
        config_from_dict({"name": "x", "train": {"amp_dtype": "fp8"}})


class FakeScaler:
    def __init__(self, state=None):
        self.state = state or {}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def test_the_grad_scaler_state_survives_a_resume_file(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
             "_growth_tracker": 17}
    checkpoints.save_resume(tmp_path / "resume.safetensors", model, optimizer, {"epoch": 1}, None, FakeScaler(state))
    restored = FakeScaler()
    info = checkpoints.load_resume(tmp_path / "resume.safetensors", nn.Linear(3, 2), optimizer, None, restored)
    assert restored.state == state and info == {"epoch": 1}


def test_a_real_grad_scaler_round_trips_and_none_is_fine(tmp_path):
    model = nn.Linear(3, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    path = tmp_path / "resume.safetensors"
    checkpoints.save_resume(path, model, None, {}, None, scaler)
    restored = torch.amp.GradScaler("cpu")
    checkpoints.load_resume(path, model, None, None, restored)
    assert restored.state_dict()["scale"] == 256.0
    checkpoints.save_resume(path, model, None, {}, None, None)  # no AMP: nothing stored, nothing loaded
    checkpoints.load_resume(path, model, None, None, restored)
    assert restored.state_dict()["scale"] == 256.0


# ---------------------------------------------------------------------------- compile, deterministic


def test_compile_wraps_the_model_once_and_keeps_its_state_dict_keys(monkeypatch):
    calls = []

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule (prefixed keys)
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            calls.append(len(x))
            return self._orig_mod(x)

    monkeypatch.setattr(torch, "compile", Compiled)
    model = nn.Linear(3, 2)
    rt = Runtime(torch.device("cpu"), torch.zeros(1), torch.ones(1), compile=True)
    net = rt.maybe_compile(model)
    assert rt.maybe_compile(model) is net  # compiled once per model
    torch.testing.assert_close(net(torch.ones(4, 3)), model(torch.ones(4, 3)))
    assert calls == [4]
    assert set(model.state_dict()) == {"weight", "bias"}
    off = Runtime(torch.device("cpu"), torch.zeros(1), torch.ones(1))
    assert off.maybe_compile(model) is model


def test_predictions_run_through_the_compiled_model(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m: (lambda x: seen.append(x.shape) or m(x)))
    rt = Runtime(torch.device("cpu"), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), compile=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    loader = [(torch.zeros(5, 3, 4, 4, dtype=torch.uint8), None)]
    fit.predict_logits(model, loader, rt, ("identity", "hflip"))
    assert [s[0] for s in seen] == [10]  # both views of the batch in one forward pass


def test_a_failing_compile_says_so_once_and_runs_uncompiled(monkeypatch, capsys):
    def broken(model):
        def call(*args):
            raise RuntimeError("InductorError: no working C compiler found\nlong traceback")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    rt = Runtime(torch.device("cpu"), torch.zeros(1), torch.ones(1), compile=True)
    model = nn.Linear(3, 2)
    x = torch.ones(2, 3)
    torch.testing.assert_close(rt.maybe_compile(model)(x), model(x))
    torch.testing.assert_close(rt.maybe_compile(nn.Linear(3, 2))(x).shape, model(x).shape)
    out = capsys.readouterr().out
    assert out.count("train.compile:") == 1 and "no working C compiler" in out and "running uncompiled" in out
    assert rt.compile_failure is not None
    other = Runtime(torch.device("cpu"), torch.zeros(1), torch.ones(1), compile=True)  # another fold's runtime
    other.maybe_compile(model)(x)
    assert capsys.readouterr().out.count("train.compile:") == 1  # it tried again, on its own


def test_unsupported_compile_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(fit, "_compile_unsupported", lambda: "torch 2.1 does not support torch.compile on Python 3.13")
    monkeypatch.setattr(torch, "compile", lambda m: pytest.fail("must not compile"))
    rt = Runtime(torch.device("cpu"), torch.zeros(1), torch.ones(1), compile=True)
    model = nn.Linear(3, 2)
    rt.maybe_compile(model)(torch.ones(1, 3))
    assert capsys.readouterr().out.strip().count("\n") == 0


def test_train_compile_is_used_for_the_unfrozen_forward_and_predictions(make_config, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from pipeline.config.paths import Paths
    from pipeline.stages.folds import run_folds
    from pipeline.stages.train import run_train

    modes = []

    class Compiled(nn.Module):  # torch.compile's OptimizedModule stand-in: its keys carry a prefix
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            modes.append("train" if self._orig_mod.training else "eval")
            return self._orig_mod(x)

    monkeypatch.setattr(torch, "compile", Compiled)
    cfg = make_config("train.num_workers=0", "augment.train=[]", "folds.n_splits=2", "train.compile=true",
                      "train.frozen.epochs=1", "train.unfrozen.epochs=1", f"runs_dir={tmp_path / 'runs'}")
    run_folds(cfg)
    run_train(cfg, fold=0)
    assert "train" in modes and "eval" in modes
    fold_dir = Paths(cfg).fold_dir(cfg.backbones[0].name, 0)
    assert not any(k.startswith("_orig_mod") for k in load_file(str(fold_dir / "best.safetensors")))


def test_deterministic_turns_on_deterministic_algorithms(monkeypatch):
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    try:
        Runtime.create(TrainConfig(deterministic=True, device="cpu"), [0.5] * 3, [0.2] * 3)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


# ---------------------------------------------------------------------------- EMA


def test_ema_follows_a_short_run():
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    initial = torch.cat([p.detach().clone().flatten() for p in model.parameters()])
    tcfg = TrainConfig(ema=True)
    ema = make_ema(tcfg, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rt = Runtime(torch.device("cpu"), torch.zeros(1), torch.ones(1))
    stepper = Stepper(optimizer, None, rt, tcfg, model.parameters(), ema)
    stepper.ema_source = model
    x = torch.randn(64, 8)
    y = x @ torch.arange(8.0).unsqueeze(1)
    for _ in range(30):
        stepper.backward(nn.functional.mse_loss(model(x), y), last=True)
    trained = torch.cat([p.detach().flatten() for p in model.parameters()])
    averaged = torch.cat([p.detach().flatten() for p in ema.module.parameters()])
    assert (averaged - trained).norm() < (averaged - initial).norm()
