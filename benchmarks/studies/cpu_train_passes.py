"""Study: a training step on a CPU at batch 64, the whole batch in one pass against the passes
``Runtime.train_chunk`` makes (2026-12-07, 2 CPU cores). Needs a suite run's scenes folder (any
config with EfficientNet-Lite0/1/2 works: pass its folder and config)::

    make bench-suite SETS=scenes RECIPES=fast
    .venv/bin/python benchmarks/studies/cpu_train_passes.py runs/bench/suite/scenes/fast configs/scenes.yaml

Measured (train img/s, two rounds each): efficientnet_lite0 224 px whole 14.5 / 13.9, passes
26.6 / 25.3; efficientnet_lite2 260 px whole 5.3 / 4.1, passes 13.2 / 14.1.
"""
import os
import sys

from pipeline.config.schema import load_config
from pipeline.data.tables import read_train_table, task_spec
from pipeline.engine import fit
from pipeline.training.budget import measure_speeds

os.chdir(sys.argv[1])
cfg = load_config(sys.argv[2])
table = read_train_table(cfg)
spec = task_spec(cfg, table)
targets = spec.encode(table)
passes = fit.Runtime.train_chunk
for entry in cfg.backbones[::2]:
    vcfg, bcfg = cfg.variant(entry)
    for mode in ("whole", "passes", "whole", "passes"):
        fit.Runtime.train_chunk = (lambda self, model, x: None) if mode == "whole" else passes
        speeds = measure_speeds(vcfg, bcfg, spec, targets, steps=3, batch=64)
        print(f"{bcfg.slug} batch 64 {mode}: train {speeds.train_img_s:.1f} img/s", flush=True)
