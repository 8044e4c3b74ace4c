"""Predict stage: a test folder through the fold checkpoints and a saved blend, to a validated submission."""
from __future__ import annotations

from pathlib import Path

from pipeline.config.schema import Config
from pipeline.ensembles.inference import predict_submission


def run_predict(cfg: Config, test_dir: str | None = None, sample: str | None = None, method: str | None = None,
                out: str | None = None) -> Path:
    """Predict a test folder (default: the competition's) and write a validated submission."""
    return predict_submission(cfg, test_dir=test_dir, sample=sample, method=method, out=out)
