"""One fingerprint: every config key either changes what a fold's result depends on or is in the
one list of run-only keys (``pipeline.config.run_only.RUN_ONLY_KEYS``), and the fold digest, the
tune objective and predict's checkpoint check all agree on that list.

Value changes are generated per type (bool flipped, int + 1, float x 2, another valid choice for
text with choices, a list changed, a value for a null), the first candidate the config accepts.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from PIL import Image

from pipeline.config import schema
from pipeline.config.paths import Paths
from pipeline.config.run_only import LEFT_OUT_OF_DIGESTS, RUN_ONLY_KEYS, digest_section, is_run_only, setting_changes
from pipeline.config.schema import flatten
from pipeline.core.errors import PipelineError
from pipeline.domain.metrics import METRICS
from pipeline.ensembles.inference import checkpoint_differences, prediction_settings
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train
from pipeline.training.fingerprint import AFTER_FOLDS, fold_digest, fold_is_done
from pipeline.training.tuned import objective_parts, tune_budget

# text keys with a closed set of values: the others valid for each
CHOICES = {
    "data.task": schema.TASKS,
    "folds.strategy": schema.FOLD_STRATEGIES,
    "metric": tuple(sorted(METRICS)),
    "backbones.0.weights": schema.WEIGHTS_KINDS,
    "train.optimizer": ("sgd", "adam", "lamb"),
    "train.loss": ("auto", "ce", "bce", "mse", "huber"),
    "train.keep": schema.KEEP,
    "train.device": ("auto", "cpu"),
    "train.amp_dtype": schema.AMP_DTYPES,
    "train.use_tuned": ("auto", "true", "false"),
    "augment.resize": ("crop", "squash", "pad"),
    "tune.sampler": schema.SAMPLERS,
    "tune.pruner": schema.PRUNERS,
    "ensemble.postprocess": ("auto", "none"),
    "submission.format": ("auto", "labels", "probabilities"),
    "tracking.backend": schema.TRACKING_BACKENDS,
    "train.executor": schema.EXECUTORS,
}

# a value for each key that is null in the test config, and for lists and mappings whose generic
# change would say little
VALUES = {
    "data.group_column": "writer",
    "data.image_extension": ".png",
    "data.classes": [str(d) for d in range(10)],
    "data.positive_class": "odd",
    "data.exclude_ids": "exclude_ids.csv",
    "data.target_columns": ["label", "writer"],
    "backbones.0.batch_size": 16,
    "backbones.0.seeds": [1, 2],
    "backbones.0.seed_group": "group",
    "backbones.0.train": {"seed": 7},
    "backbones.0.augment": {"tta": ["identity", "hflip"]},
    "train.frozen.layer_decay": 0.5,
    "train.frozen.optimizer": "sgd",
    "train.unfrozen.layer_decay": 0.5,
    "train.unfrozen.optimizer": "sgd",
    "train.grad_clip": 1.0,
    "train.early_stopping_patience": 2,
    "train.time_budget_min": 5.0,
    "time_budget_min": 5.0,
    "train.unfreeze_lrs": [1e-4],
    "train.num_workers": 2,
    "train.pseudo_labels": "pseudo.csv",
    "augment.train": [],
    "augment.crop_pct": 0.875,
    "augment.tta": ["identity", "hflip"],
    "tune.storage": "sqlite:///elsewhere.db",
    "submission.competition": "some-competition",
    "tracking.uri": "elsewhere",
    "train.ray_address": "auto",
}

# keys changed on top of other settings they need
NEEDS = {"data.positive_class": ["data.task=binary"]}

# sections a fold's digest does not look at, and why
OUT_OF_SCOPE = {
    "folds": "a fold's split is the folds file, whose content the digest holds (make folds rewrites it)",
    "tune": "the tune stage's settings: a fold sees their outcome only as train.* LRs, which the digest holds",
    "ensemble": "the ensemble stage's settings, in its own digest (stages/ensemble.py)",
    "submission": "the ensemble stage's settings, in its own digest (stages/ensemble.py)",
    "pretrain": "the pretrain stage's settings: a fold sees their outcome as the pretrained file, a digest input",
}

# run-only keys that move the experiment: its folds are looked for in another folder
MOVES_THE_EXPERIMENT = {"name", "runs_dir", "folds_dir"}

# run-only keys left out of the digest check: the digest hashes its input files by path, and the
# folds file is <folds_dir>/<name>.csv (a moved experiment has no finished folds to keep anyway)
HASHED_BY_PATH = {"name", "folds_dir"}


def leaf_keys(cfg) -> dict:
    """Every leaf key of the config, the (one) backbone entry as ``backbones.0.*``."""
    tree = cfg.to_dict()
    tree["backbones"] = {str(i): b for i, b in enumerate(tree["backbones"])}
    return flatten(tree)


def candidates(key: str, value):
    if key in VALUES:
        yield VALUES[key]
    elif key in CHOICES:
        yield from (c for c in CHOICES[key] if c != value)
    elif isinstance(value, bool):
        yield not value
    elif isinstance(value, int):
        yield from (value + 1, value - 1)
    elif isinstance(value, float):
        yield from ((value * 2 or 0.25), value / 2)
    elif isinstance(value, str):
        yield value + "-other"
    elif isinstance(value, list) and value:
        yield from (value[:-1], value + value[-1:])


def changed_config(make_config, key: str, value, base=()):
    """The test config with ``key`` changed: the first candidate it accepts, and for text the
    choices its refusal lists (``...; valid: a, b, c``); and the value it took."""
    tried, todo = [], list(candidates(key, value))
    while todo:
        new = todo.pop(0)
        tried.append(new)
        try:
            return make_config(*base, f"{key}={json.dumps(new)}"), new
        except PipelineError as exc:
            listed = re.search(r"valid: ([\w, ]+)$", str(exc))
            if isinstance(value, str) and listed:
                todo += [c for c in listed.group(1).split(", ") if c != value and c not in tried + todo]
    raise AssertionError(f"no valid changed value for config key '{key}' (now {value!r}; tried {tried}): "
                         f"add one to VALUES")


def digest(cfg) -> str:
    vcfg, bcfg = cfg.variant(cfg.backbones[0])  # as the train stage resolves each entry
    return fold_digest(vcfg, bcfg, 0)


def test_the_run_only_list_names_real_keys(make_config):
    keys = leaf_keys(make_config())
    assert set(RUN_ONLY_KEYS) <= set(keys), set(RUN_ONLY_KEYS) - set(keys)
    assert LEFT_OUT_OF_DIGESTS <= set(RUN_ONLY_KEYS) and len(set(RUN_ONLY_KEYS)) == len(RUN_ONLY_KEYS)


def test_every_key_changes_the_fold_digest_unless_it_is_run_only(make_config):
    cfg = make_config()
    keys = leaf_keys(cfg)
    checked, skipped = [], []
    for key, value in keys.items():
        section = key.split(".")[0]
        if key in HASHED_BY_PATH or (section in OUT_OF_SCOPE and not is_run_only(key)):
            skipped.append(key)
            continue
        base = NEEDS.get(key, ())
        unchanged = make_config(*base) if base else cfg
        changed, new = changed_config(make_config, key, value, base)
        assert changed.to_dict() != unchanged.to_dict(), f"{key}={new!r} changed nothing"
        before = digest(unchanged)
        if is_run_only(key):
            assert digest(changed) == before, f"run-only key {key}: {value!r} -> {new!r} changed the fold digest"
        elif key in {f"train.{k}" for k in AFTER_FOLDS}:  # a result key of the model's test predictions, not of a fold
            assert digest(changed) == before, f"{key} acts after the folds: {value!r} -> {new!r} changed the digest"
        else:
            assert digest(changed) != before, (f"{key}: {value!r} -> {new!r} left the fold digest as it was; "
                                               f"a key that cannot change a result belongs in RUN_ONLY_KEYS")
        checked.append(key)
    assert len(checked) > 60 and set(RUN_ONLY_KEYS) - HASHED_BY_PATH <= set(checked)
    assert {k.split(".")[0] for k in skipped} <= set(OUT_OF_SCOPE) | HASHED_BY_PATH


def test_an_entrys_own_override_of_a_run_only_key_keeps_the_digest(make_config):
    assert digest(make_config('backbones.0.train={"num_workers": 3, "compile": true}')) == digest(make_config())


def test_digests_hash_run_only_keys_at_their_defaults():
    train = {"compile": True, "num_workers": 4, "seed": 1, "frozen": {"lr": 0.1}}
    assert digest_section("train", train) == {"compile": False, "seed": 1, "frozen": {"lr": 0.1}}


def test_the_tune_objective_leaves_run_only_keys_out_and_old_records_still_compare(make_config):
    cfg = make_config()
    run_folds(cfg)  # the objective holds the folds file's digest
    bcfg = cfg.backbones[0]
    space = dict.fromkeys(["unfrozen_lr", "backbone_lr_mult"])
    parts = objective_parts(cfg, bcfg, tune_budget(cfg), space)
    assert not [k for k in parts if is_run_only(k)] and "train.seed" in parts
    toggled = make_config("train.compile=true", "train.cache_images=true", "train.time_budget_min=5",
                          "train.cache_features=false", "data.max_image_pixels=1000")
    assert objective_parts(toggled, toggled.backbones[0], tune_budget(toggled), space) == parts
    # a record written while these keys still counted (best.json, the study's objective) compares
    old_record = {**parts, "train.compile": True, "train.time_budget_min": 5.0, "data.max_image_pixels": 1000}
    assert setting_changes(old_record, parts) == []
    seeded = make_config("train.seed=7")
    assert setting_changes(parts, objective_parts(seeded, seeded.backbones[0], tune_budget(seeded), space)) == \
        ["train.seed"]


def test_predicts_checkpoint_check_ignores_run_only_keys_only(make_config):
    cfg = make_config()
    bcfg = cfg.backbones[0]
    saved = prediction_settings(cfg, bcfg)
    assert not [k for k in saved if is_run_only(k)]
    toggles = [f"{k}={json.dumps(next(candidates(k, v)))}" for k, v in leaf_keys(cfg).items()
               if is_run_only(k) and k.startswith("train.")]
    toggled = make_config(*toggles)
    assert checkpoint_differences(saved, prediction_settings(toggled, toggled.backbones[0]), False) == []
    changed = make_config("train.label_smoothing=0.1")
    assert checkpoint_differences(saved, prediction_settings(changed, changed.backbones[0]), False) == \
        ["train.label_smoothing: checkpoint 0.05, config 0.1"]
    # a time budget planned the checkpoint's epochs (its config holds them): the config's are a maximum
    budgeted = make_config("train.time_budget_min=5", "train.unfrozen.epochs=4")
    assert checkpoint_differences(saved, prediction_settings(budgeted, budgeted.backbones[0]), False, True) == []


# ---------------------------------------------------------------------------- a real run

def run_only_toggles(tmp_path) -> dict:
    """A changed value for every run-only key that keeps the experiment where it is."""
    return {"train.time_budget_min": 600.0,  # generous: the plan keeps the configured epoch
            "time_budget_min": 600.0,  # make all's budget: the train stage never reads it
            "train.use_tuned": "false", "train.device": "cpu", "train.num_workers": 1, "train.cache_images": True,
            "train.cache_features": False, "train.compile": True, "train.channels_last": False,
            "train.deterministic": True, "data.max_image_pixels": 10**8,
            "tune.storage": f"sqlite:///{tmp_path / 'study.db'}", "submission.competition": "some-competition",
            "submissions_dir": str(tmp_path / "other-submissions"),
            "tracking.backend": "tensorboard", "tracking.uri": str(tmp_path / "tensorboard"),
            "train.executor": "ray", "train.ray_address": "auto"}  # every fold is done: nothing is sent to Ray


@pytest.fixture
def process_settings(monkeypatch):
    """train.deterministic and data.max_image_pixels set process-wide state: put it back."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.setattr(cudnn, "deterministic", cudnn.deterministic)
    monkeypatch.setattr(cudnn, "benchmark", cudnn.benchmark)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    for name in ("CUBLAS_WORKSPACE_CONFIG", "OPENCV_IO_MAX_IMAGE_PIXELS"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_run_only_keys_retrain_no_fold_and_a_result_key_retrains(make_config, tmp_path, capsys, one_torch_thread,
                                                                 process_settings):
    pytest.importorskip("tensorboard")
    cfg = make_config("train.num_workers=0")
    run_folds(cfg)
    run_train(cfg)
    bcfg = cfg.backbones[0]
    folds = [Paths(cfg).fold_dir(bcfg.slug, k) for k in range(cfg.folds.n_splits)]

    def stamps() -> list[int]:
        return [(d / name).stat().st_mtime_ns for d in folds for name in ("best.safetensors", "history.csv")]

    trained = stamps()
    capsys.readouterr()
    toggles = run_only_toggles(tmp_path)
    assert set(toggles) | MOVES_THE_EXPERIMENT == set(RUN_ONLY_KEYS)  # every one, at once
    run_train(make_config("train.num_workers=0", *(f"{k}={json.dumps(v)}" for k, v in toggles.items())))
    out = capsys.readouterr().out
    assert stamps() == trained, out
    assert "time budget" in out and not any(f"fold {k}: kept" in out for k in range(len(folds))), out

    changed = make_config("train.num_workers=0", "train.label_smoothing=0.1")
    vcfg, vbcfg = changed.variant(changed.backbones[0])
    assert not any(fold_is_done(vcfg, vbcfg, k) for k in range(len(folds)))  # every fold would retrain
    run_train(changed, fold=0)  # one of them does
    now = stamps()
    assert now[:2] != trained[:2] and now[2:] == trained[2:]
    assert fold_is_done(vcfg, vbcfg, 0) and not fold_is_done(vcfg, vbcfg, 1)
