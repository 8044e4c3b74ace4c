"""Presets (``preset: fast | balanced | best``): each resolves to its documented values; the YAML
file's keys override the preset (mappings merged, lists replaced) and ``key=value`` words override
both, ``preset=...`` among them; an unknown name is one line naming the valid ones; ``init`` writes
``preset: balanced`` with the keys it sets commented; the resolved config (and so every digest)
holds the preset's values, not the word; the bench section runs on a tiny preset."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import shrunk_raw_config, write_dataset

from pipeline.cli import main
from pipeline.config import presets
from pipeline.config.schema import config_from_dict, dump_config, load_config
from pipeline.core.errors import PipelineError
from pipeline.training.fingerprint import fold_digest

DOCS = Path(__file__).resolve().parents[1] / "docs"

# the documented values (docs/training.md#presets), written out: the tables must not drift from them
NATIVE = [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)]
DOCUMENTED = {
    "fast": {"backbones": NATIVE, "unfreeze": "never", "epochs": 3, "tta": ["identity"], "methods": ["mean"]},
    "balanced": {"backbones": NATIVE, "unfreeze": "auto", "epochs": 3, "tta": ["identity", "hflip"],
                 "methods": ["mean", "hill_climb"]},
    "best": {"backbones": NATIVE, "unfreeze": "auto", "epochs": 3, "tta": ["identity", "hflip"],
             "methods": ["mean", "hill_climb", "stacking"]},
}


def resolved(cfg) -> dict:
    return {"backbones": [(b.name, b.image_size) for b in cfg.backbones], "unfreeze": cfg.train.unfreeze,
            "epochs": cfg.train.unfrozen.epochs, "tta": cfg.augment.tta, "methods": cfg.ensemble.methods}


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_each_preset_resolves_to_its_documented_values(name):
    cfg = config_from_dict({"name": "x", "preset": name})
    assert resolved(cfg) == DOCUMENTED[name]
    assert all(b.weights == "bundled" for b in cfg.backbones)  # offline
    # the other photo defaults are the schema's own, whatever the preset
    t = cfg.train
    assert (t.linear_probe, t.freeze_bn, t.unfrozen.lr, t.keep) == (True, True, 1e-4, "best")
    assert all(why and "\n" not in why for _, why in presets.PRESETS[name].values())  # each entry: one reason
    row = next(line for line in (DOCS / "training.md").read_text().splitlines() if line.startswith(f"| `{name}` |"))
    for model, size in DOCUMENTED[name]["backbones"]:
        assert f"{model} at {size} px" in row
    assert f"`{DOCUMENTED[name]['unfreeze']}`" in row and ", ".join(DOCUMENTED[name]["methods"]) in row


def test_no_preset_is_the_schema_defaults():
    assert config_from_dict({"name": "x"}) == config_from_dict({"name": "x", "preset": None})
    assert config_from_dict({"name": "x"}).backbones[0].image_size is None


def test_yaml_keys_override_the_preset(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", {
        "preset": "balanced",
        "backbones": [{"name": "efficientnet_lite2", "weights": "bundled", "image_size": 200}],  # replaces both
        "train": {"batch_size": 8, "unfrozen": {"lr": 3e-4}},  # merged with the preset's train keys
        "augment": {"tta": ["identity"]},  # a list: replaces the preset's
    })
    cfg = load_config(path)
    assert [(b.name, b.image_size) for b in cfg.backbones] == [("efficientnet_lite2", 200)]
    assert cfg.train.batch_size == 8 and cfg.train.unfrozen.lr == 3e-4
    assert cfg.train.unfreeze == "auto" and cfg.train.unfrozen.epochs == 3  # still the preset's
    assert cfg.train.unfrozen.warmup_epochs == 0.5  # and the schema's default below both
    assert cfg.augment.tta == ["identity"] and cfg.ensemble.methods == ["mean", "hill_climb"]
    fast = load_config(write_yaml(tmp_path / "y.yaml", {"preset": "fast", "train": {"unfreeze": "always"}}))
    assert fast.train.unfreeze == "always" and [b.name for b in fast.backbones] == [n for n, _ in NATIVE]


def test_command_line_words_override_the_file_and_the_preset(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", {"preset": "balanced", "augment": {"tta": ["identity"]}})
    cfg = load_config(path, ["augment.tta=[identity,vflip]", "backbones.1.image_size=256", "train.unfreeze=always",
                             "ensemble.methods=[stacking]"])
    assert cfg.augment.tta == ["identity", "vflip"]  # over the file's
    assert [(b.name, b.image_size) for b in cfg.backbones] == [NATIVE[0], ("efficientnet_lite1", 256), NATIVE[2]]
    assert cfg.train.unfreeze == "always" and cfg.ensemble.methods == ["stacking"]  # over the preset's
    one = load_config(path, ["backbones=[{name: test_efficientnet, weights: none, image_size: 32}]"])
    assert [b.name for b in one.backbones] == ["test_efficientnet"]  # a list word replaces the preset's list


def test_preset_on_the_command_line(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", {"preset": "balanced", "train": {"unfreeze": "always"}})
    cfg = load_config(path, ["backbones.0.image_size=128", "preset=fast"])  # the word's place does not matter
    assert [(b.name, b.image_size) for b in cfg.backbones] == [("efficientnet_lite0", 128), *NATIVE[1:]]  # fast's+word
    assert cfg.ensemble.methods == ["mean"]  # fast's
    assert cfg.train.unfreeze == "always"  # the file's key still beats the preset the word chose
    assert resolved(load_config(path, ["preset=best", "preset=fast"]))["methods"] == ["mean"]  # the last word
    assert resolved(config_from_dict({"name": "x"}, ["preset=best"])) == DOCUMENTED["best"]
    plain = load_config(path, ["preset=null"])  # no preset: the file over the schema's defaults
    assert plain.backbones[0].image_size is None and plain.ensemble.methods == ["mean", "weighted", "hill_climb"]
    with pytest.raises(PipelineError, match="'preset'"):
        config_from_dict({"name": "x", "preset": "fast"}, ["preset.epochs=1"])


@pytest.mark.parametrize("where", ["file", "word"])
def test_an_unknown_preset_is_one_line_naming_the_valid_ones(tmp_path, capsys, where):
    path = write_yaml(tmp_path / "x.yaml", {"preset": "fastest"} if where == "file" else {})
    words = ["preset=fastest"] if where == "word" else []
    with pytest.raises(PipelineError) as info:
        load_config(path, words)
    message = str(info.value)
    assert "\n" not in message and "'fastest' is not a preset" in message
    assert re.search(r"valid: fast, balanced, best\b", message)
    assert main(["folds", "-c", str(path), *words]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastest" in err
    with pytest.raises(PipelineError, match="valid keys: .*preset"):  # a misspelt key lists it among the keys
        config_from_dict({"name": "x", "presets": "fast"})


def test_init_writes_balanced_and_its_commented_keys_are_a_valid_choice(tmp_path, monkeypatch):
    from pipeline.stages.init import run_init

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data" / "comp"
    write_dataset(root, "multiclass", n_train=30, n_test=6)
    path = run_init(root)
    text = path.read_text()
    assert "\npreset: balanced " in text and "fast:" in text and "best:" in text
    cfg = load_config(path)
    assert resolved(cfg) == DOCUMENTED["balanced"]
    raw = yaml.safe_load(text)  # the keys the preset sets are not live: they would override it
    assert "backbones" not in raw and "ensemble" not in raw and "tta" not in raw["augment"]
    assert "unfreeze" not in raw["train"] and "epochs" not in raw["train"]["unfrozen"]
    assert "lr" in raw["train"]["unfrozen"] and raw["train"]["linear_probe"] is True  # the rest stays
    for name in presets.PRESETS:  # the written file with ARGS="preset=<name>" is that preset, every key of it
        chosen = load_config(path, [f"preset={name}"])
        assert resolved(chosen) == DOCUMENTED[name]
        assert chosen.augment.frozen_zoom == presets.preset_value(name, "augment.frozen_zoom")
    # uncommenting the backbones block chooses init's own backbone at the measured size
    lines = text.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("# backbones:  ")))
    last = next(i for i in range(first, len(lines)) if lines[i].startswith("#     image_size:"))
    lines[first:last + 1] = [line[2:] for line in lines[first:last + 1]]
    mine = config_from_dict(yaml.safe_load("\n".join(lines)))
    assert [(b.name, b.image_size) for b in mine.backbones] == [("efficientnet_lite0", 96)]  # 8x8 digits: the floor
    assert mine.train.unfreeze == "auto" and mine.ensemble.methods == ["mean", "hill_climb"]  # the rest: the preset


def test_the_resolved_config_and_the_digest_hold_the_presets_values(digits_root, tmp_path):
    raw = shrunk_raw_config(digits_root, tmp_path)
    for section, key in (("train", "unfreeze"), ("augment", "tta")):
        raw[section].pop(key)
    raw["train"]["unfrozen"].pop("epochs")
    raw.pop("backbones"), raw.pop("ensemble")

    def digest(cfg) -> str:
        vcfg, bcfg = cfg.variant(cfg.backbones[0])
        return fold_digest(vcfg, bcfg, 0)

    fast, balanced = config_from_dict({**raw, "preset": "fast"}), config_from_dict({**raw, "preset": "balanced"})
    assert fast.to_dict() != balanced.to_dict()
    assert fast.backbones[0] == balanced.backbones[0] and digest(fast) != digest(balanced)  # train.unfreeze differs
    # the word itself is in neither the resolved config nor a digest: the same values spelt out are the same run
    assert "preset" not in balanced.to_dict()
    dumped = yaml.safe_load(dump_config(balanced))
    assert [b["name"] for b in dumped["backbones"]] == [n for n, _ in NATIVE]
    assert dumped["train"]["unfreeze"] == "auto" and dumped["ensemble"]["methods"] == ["mean", "hill_climb"]
    spelt = config_from_dict(dumped)
    assert spelt == balanced and digest(spelt) == digest(balanced)
    # explicit keys for everything the preset sets: the preset changes nothing
    full = shrunk_raw_config(digits_root, tmp_path)
    assert config_from_dict({**full, "preset": "best"}) == config_from_dict(full)


@pytest.mark.slow
def test_the_presets_bench_section_runs_a_whole_run(make_config, tmp_path, monkeypatch, one_torch_thread):
    from conftest import _digits

    from pipeline.bench.photos import bench_presets

    tiny = [{"name": "test_efficientnet", "weights": "none", "image_size": 32}]
    monkeypatch.setitem(presets.PRESETS, "fast", {**presets.PRESETS["fast"], "backbones": (tiny, "tiny")})
    data = write_dataset(tmp_path / "data", "multiclass", n_train=60, n_test=12)
    labels = _digits()[1][60:72]
    pd.DataFrame({"image_id": [f"test_{i:04d}" for i in range(12)], "label": [str(v) for v in labels]}).to_csv(
        tmp_path / "data" / "solution.csv", index=False)
    cfg = make_config("folds.n_splits=2", "folds.strategy=kfold", data=data)  # demo's backbones, tta, ensemble
    md = bench_presets(cfg, presets=("fast",))
    row = next(line for line in md.splitlines() if line.startswith("| fast |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "test_efficientnet 32 px" and cells[2] == "none"  # the preset's backbone, frozen-only
    assert cells[3].split(" ")[0] in ("test_efficientnet", "mean")  # the leaderboard's pick
    assert 0 <= float(cells[4]) <= 1 and 0 <= float(cells[5]) <= 1
    run = tmp_path / "runs" / "bench" / "presets-fast-s42"
    assert (run / "runs" / f"{cfg.name}-fast" / "ensemble" / "mean" / "cv.json").exists()
    assert not (run / "runs" / f"{cfg.name}-fast" / "ensemble" / "hill_climb").exists()  # fast's methods: mean
    assert (run / "subs" / "leaderboard.csv").exists()
