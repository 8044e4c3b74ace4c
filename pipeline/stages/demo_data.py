"""Demo data: scikit-learn's bundled handwritten digits written in Kaggle layout.

1,797 real 8x8 scans, no download. A fixed, seeded, stratified 80/20 split gives
``train/*.png`` + ``train.csv`` (``image_id,label``) and ``test/*.png`` +
``sample_submission.csv``, plus ``solution.csv`` with the true test labels for scoring.
Ids carry no extension (as in many competitions); the files are PNGs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pipeline.core import artifacts

SEED = 2024


def _write_png(path: Path, pixels: np.ndarray) -> None:
    with artifacts.atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def run_demo_data(root: str | Path = "data/digits", force: bool = False) -> Path:
    root = Path(root)
    done = [root / "train.csv", root / "sample_submission.csv", root / "solution.csv"]
    digest = artifacts.fingerprint({"dataset": "sklearn-digits", "seed": SEED, "version": 1})
    if not force and artifacts.is_up_to_date(done, digest):
        print(f"demo-data: {root} is up to date (use --force to redo)")
        return root
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    ids = np.array([f"digit_{i:04d}" for i in range(len(images))])
    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=0.2, random_state=SEED,
                                           stratify=digits.target)
    for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        for i in idx:
            _write_png(root / split / f"{ids[i]}.png", images[i])
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    artifacts.write_csv(root / "train.csv", pd.DataFrame({"image_id": ids[train_idx],
                                                          "label": digits.target[train_idx]}))
    artifacts.write_csv(root / "sample_submission.csv", pd.DataFrame({"image_id": ids[test_idx], "label": 0}))
    artifacts.write_csv(root / "solution.csv", pd.DataFrame({"image_id": ids[test_idx],
                                                             "label": digits.target[test_idx]}))
    artifacts.mark_done(done, digest)
    print(f"demo-data: wrote {root} ({len(train_idx)} train, {len(test_idx)} test images)")
    return root
