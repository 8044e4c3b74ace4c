"""One change at a time: the frozen head (or probe) against fine-tuning, on a few folds.

The quick screen behind the training defaults (docs/training.md; BENCHMARKS.md, finetune). Per
fold it prints one JSON line: the validation score after the frozen phase and after each unfrozen
epoch, the training loss of the frozen phase's last epoch and of the first 10 unfrozen batches,
and the hidden-test accuracy (against ``solution.csv`` beside the sample submission) of the
frozen head and of the last unfrozen epoch's weights. Runs live under ``runs/ablation``.

    .venv/bin/python tools/finetune_ablation.py configs/scenes.yaml 0,1 train.freeze_bn=false
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import pandas as pd

from pipeline.config.paths import Paths
from pipeline.config.schema import load_config
from pipeline.data.tables import read_folds, read_test_table, task_spec
from pipeline.engine.fit import activate_mean
from pipeline.stages.folds import run_folds
from pipeline.training.trainer import FoldJob, FoldTrainer


def main(config: str, folds: str, *overrides: str) -> None:
    cfg = load_config(config, ["runs_dir=runs/ablation", "folds_dir=runs/ablation/folds", "train.use_tuned=false",
                               *overrides])
    run_folds(cfg)
    table, test = read_folds(cfg), read_test_table(cfg)
    spec, bcfg, id_col = task_spec(cfg, table), cfg.backbones[0], cfg.data.id_column
    solution = pd.read_csv(Paths(cfg).sample_submission.parent / "solution.csv", dtype=str)
    y_test = spec.encode(solution.set_index(id_col).loc[test[id_col]].reset_index())

    def test_accuracy(trainer: FoldTrainer) -> float:
        logits = trainer.predict(trainer.eval_model, np.arange(len(test)), test=True, views=cfg.augment.tta)
        return float(np.mean(activate_mean(spec, logits).argmax(1) == y_test))

    t = cfg.train
    for fold in map(int, folds.split(",")):
        start = time.perf_counter()
        trainer = FoldTrainer(FoldJob(cfg, bcfg, spec, table, fold, test=test, progress=False,
                                      feature_cache_dir=Paths(cfg).feature_cache_dir(bcfg.name)))
        trainer.batch_losses = []
        if t.linear_probe:
            trainer.linear_probe_phase()
        else:
            trainer.frozen_phase(t.frozen, 0)
        n_frozen = len(trainer.state.history)
        frozen_test = test_accuracy(trainer)
        trainer.unfrozen_phase(t.unfrozen, n_frozen, n_frozen)
        history, key = trainer.state.history, f"valid_{cfg.metric}"
        print(json.dumps({"fold": fold, "overrides": list(overrides),
                          "frozen_valid": round(history[n_frozen - 1][key], 4),
                          "unfrozen_valid": [round(r[key], 4) for r in history[n_frozen:]],
                          "frozen_train_loss": round(history[n_frozen - 1]["train_loss"], 4),
                          "first10_losses": [round(x, 3) for x in trainer.batch_losses[:10]],
                          "frozen_test": round(frozen_test, 4), "fine_tuned_test": round(test_accuracy(trainer), 4),
                          "notes": trainer.notes, "seconds": round(time.perf_counter() - start)}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
