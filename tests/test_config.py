"""Config: the real demo config loads, overrides apply, and every bad key, value or override is a
PipelineError that names the key and lists what is valid. The CLI prints it without a traceback."""
from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import DEMO_CONFIG

from pipeline.cli import main
from pipeline.config.schema import FOLD_STRATEGIES, TASKS, Config, config_from_dict, dump_config, load_config
from pipeline.core.errors import PipelineError

TOP_LEVEL_KEYS = [f.name for f in dataclasses.fields(Config)]


# ---------------------------------------------------------------------------- good configs


def test_demo_config_loads_with_its_file_stem_as_name():
    cfg = load_config(DEMO_CONFIG)
    assert cfg.name == "demo"
    assert cfg.data.task == "multiclass" and cfg.data.id_column == "image_id"
    assert [(b.name, b.slug) for b in cfg.backbones] == [("efficientnet_lite0", "lite0-48"),
                                                         ("efficientnet_lite0", "lite0-64")]
    assert cfg.folds.strategy in FOLD_STRATEGIES


def test_make_config_builds_the_shrunk_demo_config(make_config, digits_root, tmp_path):
    cfg = make_config()
    assert cfg.data.root == str(digits_root)
    assert cfg.folds_dir == str(tmp_path / "folds") and cfg.runs_dir == str(tmp_path / "runs")
    assert [(b.name, b.weights, b.image_size) for b in cfg.backbones] == [("test_efficientnet", "none", 32)]
    assert (cfg.train.batch_size, cfg.train.frozen.epochs, cfg.train.unfrozen.epochs) == (32, 1, 1)
    assert cfg.augment.tta == ["identity"] and cfg.folds.n_splits == 3


def test_make_config_merges_sections_and_accepts_override_lists(make_config):
    cfg = make_config(["folds.n_splits=4", "folds.seed=7"], "metric=log_loss", train={"batch_size": 8})
    assert (cfg.folds.n_splits, cfg.folds.seed, cfg.metric, cfg.train.batch_size) == (4, 7, "log_loss", 8)
    assert cfg.train.frozen.epochs == 1  # merged, not replaced


def test_overrides_are_parsed_as_yaml_values(make_config):
    cfg = make_config("train.unfrozen.lr=3e-4", "augment.tta=[identity,hflip]", "train.ema=true",
                      "data.target_columns=label", "data.group_column=", "tune.weight_decay=[1e-4, 1e-2]")
    assert cfg.train.unfrozen.lr == pytest.approx(3e-4) and isinstance(cfg.train.unfrozen.lr, float)
    assert cfg.augment.tta == ["identity", "hflip"]
    assert cfg.train.ema is True
    assert cfg.data.target_columns == ["label"]  # a single item where a list is expected
    assert cfg.data.group_column is None  # empty value: null
    assert cfg.tune.weight_decay == [1e-4, 1e-2]


def test_override_of_a_list_item_by_index(make_config):
    cfg = make_config("backbones.0.image_size=48", "backbones.0.drop_rate=0.2")
    assert cfg.backbones[0].image_size == 48 and cfg.backbones[0].drop_rate == pytest.approx(0.2)
    assert cfg.backbones[0].name == "test_efficientnet"  # the rest of the item is kept


def test_override_adds_a_key_absent_from_the_file(make_config):
    cfg = make_config("folds.n_bins=4", "train.grad_clip=1.0")
    assert cfg.folds.n_bins == 4 and cfg.train.grad_clip == 1.0


def test_config_is_frozen(make_config):
    cfg = make_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.folds.n_splits = 7  # type: ignore[misc]


def test_dumped_config_loads_back_equal(make_config):
    cfg = make_config("backbones.0.image_size=40", "folds.strategy=kfold")
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


# ---------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("word, key, valid", [
    ("foo=1", "'foo'", TOP_LEVEL_KEYS),
    ("folds.nsplits=3", "'folds.nsplits'", ["n_splits", "strategy", "seed", "n_bins"]),
    ("train.frozen.lrr=1", "'train.frozen.lrr'", ["epochs", "lr", "backbone_lr_mult", "warmup_epochs"]),
    ("data.target_column=label", "'data.target_column'", ["target_columns", "id_column", "group_column"]),
    ("backbones.0.imagesize=48", "'backbones[0].imagesize'", ["name", "weights", "image_size"]),
])
def test_unknown_key_names_it_and_lists_the_valid_keys(make_config, word, key, valid):
    with pytest.raises(PipelineError, match="unknown config key") as info:
        make_config(word)
    message = str(info.value)
    assert key in message
    for name in valid:
        assert name in message


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["train"]["epochs"] = 3
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PipelineError, match=r"exp\.yaml.*unknown config key 'train\.epochs'.*batch_size"):
        load_config(path)


def test_unknown_key_given_as_a_section_mapping(make_config):
    with pytest.raises(PipelineError, match=r"unknown config key 'tune\.trails'.*trials"):
        make_config(tune={"trails": 3})


# ---------------------------------------------------------------------------- bad overrides


@pytest.mark.parametrize("word, match", [
    ("folds.n_splits", "not of the form key.sub=value"),
    ("augment.tta=[identity", "not valid YAML"),
    ("backbones.3.image_size=48", r"'backbones\.3'.*not an index of a list of 1 items"),
    ("backbones.x.image_size=48", r"'backbones\.x'.*not an index"),
    ("train.unfrozen.lr=abc", r"'train\.unfrozen\.lr'.*expected a number"),
])
def test_bad_override_is_a_clear_error(make_config, word, match):
    with pytest.raises(PipelineError, match=match):
        make_config(word)


def test_override_two_levels_below_a_scalar_is_a_clear_error(make_config):
    with pytest.raises(PipelineError, match="parent is not a section"):
        make_config("folds.seed.value.x=1")  # 'seed' is a number, not a section


@pytest.mark.parametrize("word", ["name.sub=1", "folds.seed.value=1"])
def test_override_of_a_key_below_a_scalar_is_a_pipeline_error(make_config, word):
    with pytest.raises(PipelineError, match="is a value, not a section"):
        make_config(word)


# ---------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("word, key, match", [
    ("folds.n_splits=1", "folds.n_splits", "at least 2"),
    ("folds.n_bins=1", "folds.n_bins", "at least 2"),
    ("train.unfrozen.lr=-1", "train.unfrozen.lr", r"\(0, 10\)"),
    ("train.frozen.lr=0", "train.frozen.lr", r"\(0, 10\)"),
    ("train.unfrozen.epochs=-1", "train.unfrozen.epochs", ">= 0"),
    ("train.label_smoothing=1", "train.label_smoothing", r"\[0, 1\)"),
    ("train.batch_size=0", "train.batch_size", "at least 1"),
    ("backbones.0.image_size=4", "backbones[0].image_size", "at least 8"),
    ("tune.frozen_lr=[0.1,0.001]", "tune.frozen_lr", "0 < low < high"),
    ("tune.unfrozen_lr=[0,0.001]", "tune.unfrozen_lr", "0 < low < high"),
    ("tune.backbone_lr_mult=[0.5]", "tune.backbone_lr_mult", r"\[low, high\]"),
    ("tune.trials=0", "tune.trials", "at least 1"),
])
def test_out_of_range_value_names_the_key(make_config, word, key, match):
    with pytest.raises(PipelineError, match=match) as info:
        make_config(word)
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize("word, key, valid", [
    ("metric=acc", "metric", ["accuracy", "roc_auc", "log_loss", "rmse", "f1_macro"]),
    ("folds.strategy=stratifed", "folds.strategy", list(FOLD_STRATEGIES)),
    ("data.task=segmentation", "data.task", list(TASKS)),
    ("augment.tta=[identity,flip]", "augment.tta", ["hflip", "vflip", "rot90"]),
    ("train.loss=focal", "train.loss", ["ce", "bce", "mse", "huber"]),
    ("ensemble.methods=[mean,blend]", "ensemble.methods", ["mean", "weighted", "rank", "hill_climb", "stacking"]),
    ("tune.sampler=grid", "tune.sampler", ["tpe", "random"]),
])
def test_unknown_choice_lists_the_valid_ones(make_config, word, key, valid):
    with pytest.raises(PipelineError, match="valid") as info:
        make_config(word)
    message = str(info.value)
    assert f"'{key}'" in message
    for name in valid:
        assert name in message


@pytest.mark.parametrize("word, key, match", [
    ("folds.n_splits=abc", "folds.n_splits", "expected an integer"),
    ("folds.n_splits=2.5", "folds.n_splits", "expected an integer"),
    ("train.batch_size=true", "train.batch_size", "expected an integer"),
    ("train.ema=maybe", "train.ema", "expected true or false"),
    ("train.weight_decay=[0.1]", "train.weight_decay", "expected a number"),
    ("train=5", "train", "expected a mapping"),
    ("name=", "name", "may not be null"),
    ("data.target_columns={a: 1}", "data.target_columns[0]", "expected text"),
])
def test_value_of_the_wrong_type_names_the_key(make_config, word, key, match):
    with pytest.raises(PipelineError, match=match) as info:
        make_config(word)
    assert f"'{key}'" in str(info.value)


def test_duplicate_backbone_names_are_an_error(make_config):
    with pytest.raises(PipelineError, match="unique"):
        make_config(backbones=[{"name": "test_efficientnet"}, {"name": "test_efficientnet"}])


def test_backbone_lookup_lists_the_configured_ones(make_config):
    cfg = make_config()
    assert cfg.backbone("test_efficientnet").image_size == 32
    with pytest.raises(PipelineError, match="valid: test_efficientnet"):
        cfg.backbone("resnet50")


# ---------------------------------------------------------------------------- config files


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="does not exist.*configs/demo.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, match", [("data: [unclosed", "not valid YAML"), ("- a\n- b\n", "mapping")])
def test_malformed_config_file_is_an_error(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=match):
        load_config(path)


# ---------------------------------------------------------------------------- CLI


def test_cli_bad_config_key_exits_2_with_a_one_line_error(capsys):
    code = main(["folds", "-c", str(DEMO_CONFIG), "folds.nsplits=3"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: ") and "folds.nsplits" in err and "n_splits" in err
    assert "Traceback" not in out + err


def test_cli_bad_override_syntax_exits_2(capsys):
    code = main(["folds", "-c", str(DEMO_CONFIG), "folds.n_splits"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "key.sub=value" in err


def test_a_partly_given_section_keeps_its_own_defaults():
    """`train: {unfrozen: {epochs: 5}}` changes the epochs of the documented unfrozen phase (LR 1e-4,
    backbone x1, warmup 0.5), not every key to a generic phase's defaults."""
    default = config_from_dict({"name": "x"}).train
    for cfg in (config_from_dict({"name": "x", "train": {"unfrozen": {"epochs": 5}}}),
                config_from_dict({"name": "x"}, ["train.unfrozen.epochs=5"])):
        assert cfg.train.unfrozen == dataclasses.replace(default.unfrozen, epochs=5)
        assert cfg.train.frozen == default.frozen
