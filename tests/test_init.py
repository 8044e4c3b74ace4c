"""`python -m pipeline init DATA_DIR`: the config it writes for every layout and task type loads and
holds the right inferred keys; folds and train run on it unchanged (shrunk by override words only);
what it cannot decide is one line; it never overwrites a config; its data report finds planted
duplicates, a train/test leak, missing, orphan and unreadable images."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import GROUP_COLUMN, ID_COLUMN, write_dataset

from pipeline.cli import main
from pipeline.config.draft import Draft, render
from pipeline.config.schema import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.inspect import image_size, inspect_competition
from pipeline.data.report import find
from pipeline.data.scan import near_pairs, scan_images
from pipeline.stages.init import config_name, run_init

# (task kind of write_dataset, layout, ids with extension) -> task, targets, format, metric
CASES = {
    "multiclass-csv": ("multiclass", "csv", False, "multiclass", ["label"], "labels", "accuracy"),
    "multiclass-csv-ext": ("multiclass", "csv", True, "multiclass", ["label"], "labels", "accuracy"),
    "multiclass-folders": ("multiclass", "folders", False, "multiclass", ["label"], "labels", "accuracy"),
    "binary-csv": ("binary", "csv", False, "binary", ["label"], "probabilities", "roc_auc"),
    "binary-folders": ("binary", "folders", False, "binary", ["label"], "probabilities", "roc_auc"),
    "multilabel-lists": ("multilabel", "csv", False, "multilabel", ["labels"], "labels", "f1"),
    "multilabel-columns": ("multilabel_columns", "csv", True, "multilabel", ["odd", "round", "small"],
                           "probabilities", "roc_auc"),
    "regression": ("regression", "csv", True, "regression", ["target"], "auto", "rmse"),
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The repository's relative folders (configs/, runs/) under tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", list(CASES))
def test_init_infers_each_layout_and_task(workdir, case):
    kind, layout, ext, task, targets, fmt, metric = CASES[case]
    root = workdir / "data" / "comp"
    write_dataset(root, kind, n_train=60, n_test=12, layout=layout, id_extension=ext)
    path = run_init(root)
    assert path == Path("configs/comp.yaml")
    cfg = load_config(path)
    d = cfg.data
    assert (d.task, d.target_columns, d.id_column) == (task, targets, ID_COLUMN)
    assert d.train_csv == ("train.csv" if layout == "csv" else None)
    assert (d.train_dir, d.test_dir, d.sample_submission) == ("train", "test", "sample_submission.csv")
    assert (cfg.submission.format, cfg.metric) == (fmt, metric)
    assert [(b.name, b.weights, b.image_size) for b in cfg.backbones] == [  # preset: balanced
        ("efficientnet_lite0", "bundled", 224), ("efficientnet_lite1", "bundled", 240),
        ("efficientnet_lite2", "bundled", 260)]
    assert "\n#     image_size: 96 " in path.read_text()  # 8x8 digits: the smallest size allowed, commented
    assert cfg.train.linear_probe and cfg.train.freeze_bn and cfg.augment.tta == ["identity", "hflip"]
    assert cfg.augment.train == [{"name": "HorizontalFlip", "p": 0.5}]
    text = path.read_text()
    if layout == "csv":  # a column named like groups (writer): set, and no writer spans two folds
        assert d.group_column == GROUP_COLUMN and f"  group_column: {GROUP_COLUMN}" in text
        assert cfg.folds.strategy == ("stratified_group" if task in ("binary", "multiclass") else "group")
    else:
        assert cfg.folds.strategy == "stratified" and d.group_column is None
    assert "evaluation page" in text and "weights: hub" in text  # the metric's caveat; the hub alternative
    if task == "binary":
        train = pd.read_csv(root / "train.csv") if layout == "csv" else None
        counts = (train["label"].value_counts() if train is not None else
                  pd.Series({c.name: len(list(c.iterdir())) for c in (root / "train").iterdir()}))
        rarer = counts.idxmin() if counts.min() < counts.max() else sorted(counts.index)[-1]
        assert d.positive_class == rarer
    assert (workdir / "runs" / "comp" / "data_report.md").exists()
    assert (workdir / "runs" / "comp" / "data_report.png").stat().st_size > 1000


@pytest.mark.slow
def test_folds_and_train_run_on_the_written_config(workdir, one_torch_thread):
    from pipeline.stages.folds import run_folds
    from pipeline.stages.train import run_train

    root = workdir / "data" / "digits-comp"
    write_dataset(root, "multiclass", n_train=60, n_test=12)
    path = run_init(root)
    shrink = ["backbones=[{name: test_efficientnet, weights: none, image_size: 32}]",  # the preset's two, replaced
              "train.frozen.epochs=1", "train.unfrozen.epochs=1", "folds.n_splits=2", "augment.tta=[identity]"]
    cfg = load_config(path, shrink)
    folds = pd.read_csv(run_folds(cfg))
    assert sorted(folds["fold"].unique()) == [0, 1] and len(folds) == 60
    run_train(cfg)
    out = workdir / "runs" / "digits-comp" / "test_efficientnet"
    oof = pd.read_csv(out / "oof.csv")
    assert len(oof) == 60 and [c for c in oof.columns if c.startswith("pred_")] == [f"pred_{c}" for c in range(10)]
    assert (out / "cv.json").exists() and len(pd.read_csv(out / "test.csv")) == 12


def test_an_existing_config_is_never_overwritten(workdir, capsys):
    root = workdir / "data" / "comp"
    write_dataset(root, "multiclass", n_train=30, n_test=6)
    (workdir / "configs").mkdir()
    (workdir / "configs" / "comp.yaml").write_text("mine: true\n")
    assert main(["init", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "configs/comp.yaml exists" in err and "\n" not in err
    assert (workdir / "configs" / "comp.yaml").read_text() == "mine: true\n"
    assert not (workdir / "runs").exists()  # refused before reading anything


def _error(root, *words) -> str:
    with pytest.raises(PipelineError) as info:
        run_init(root, given_words=words)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_what_init_cannot_decide_is_one_line_naming_the_key(workdir, capsys):
    root = workdir / "data" / "comp"
    write_dataset(root, "multiclass", n_train=30, n_test=6)
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str)
    train = pd.read_csv(root / "train.csv", dtype=str)

    sample.insert(1, "file", sample[ID_COLUMN])  # two columns name the test images
    train["file"] = train[ID_COLUMN]
    sample.to_csv(root / "sample_submission.csv", index=False)
    train.to_csv(root / "train.csv", index=False)
    message = _error(root)
    assert "'image_id', 'file'" in message and "data.id_column=" in message
    assert main(["init", str(root)]) == 2 and capsys.readouterr().err.count("\n") == 1  # the CLI: one line
    # the word it names decides it; the other column is then the target the sample names
    sample.drop(columns="file").to_csv(root / "sample_submission.csv", index=False)
    assert load_config(run_init(root, given_words=["data.id_column=image_id"])).data.id_column == ID_COLUMN
    shutil.rmtree(workdir / "configs")

    train["label"] = [f"free text {i}" for i in range(len(train))]  # neither classes nor numbers
    train.to_csv(root / "train.csv", index=False)
    message = _error(root)
    assert "'label'" in message and "data.task" in message

    sample.drop(columns="file").rename(columns={"label": "score"}).to_csv(root / "sample_submission.csv", index=False)
    message = _error(root)
    assert "'score'" in message and "data.target_columns" in message

    (root / "sample_submission.csv").unlink()
    message = _error(root)
    assert "no sample submission" in message and "data.sample_submission" in message

    assert "valid keys" in _error(root, "metric=f1")


def test_ambiguous_targets_and_folders(workdir):
    root = workdir / "data" / "comp"
    write_dataset(root, "regression", n_train=30, n_test=6)
    train = pd.read_csv(root / "train.csv", dtype=str)
    train["target2"] = train["target"]
    train.to_csv(root / "train.csv", index=False)
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str)
    sample["target2"] = "0.0"
    sample.to_csv(root / "sample_submission.csv", index=False)
    message = _error(root)
    assert "not 0/1" in message and "data.task" in message
    shutil.rmtree(root / "test")
    assert "no test image folder" in _error(root)


def _plant(root: Path) -> None:
    """A train/test leak, identical train images with different labels, a missing, an orphan and
    an unreadable train image."""
    train = pd.read_csv(root / "train.csv", dtype=str).set_index(ID_COLUMN)
    assert train.loc["img_0001", "label"] != train.loc["img_0002", "label"]
    shutil.copy(root / "train" / "img_0001.png", root / "train" / "img_0002.png")  # same bytes, labels 1 and 2
    shutil.copy(root / "train" / "img_0003.png", root / "test" / "test_0000.png")  # test_0000 is in the sample
    (root / "train" / "img_0005.png").unlink()
    shutil.copy(root / "train" / "img_0007.png", root / "train" / "stray.png")
    (root / "train" / "img_0006.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def test_the_report_finds_planted_duplicates_leaks_and_missing_files(workdir, capsys):
    root = workdir / "data" / "comp"
    write_dataset(root, "multiclass", n_train=40, n_test=8)
    _plant(root)
    comp = inspect_competition(root)
    findings = find(comp, scan_images(sorted(set(comp.train_files) | set(comp.test_files))))
    conflict_ids = [sorted(g["id"]) for g in findings.exact_conflicts]
    assert ["img_0001", "img_0002"] in conflict_ids
    leak = findings.train_test_exact
    assert leak["test_id"].tolist() == ["test_0000"] and leak["train_ids"].iloc[0] == ["img_0003"]
    assert findings.rows_without_images == {"train": ["img_0005"], "test": []}
    assert findings.images_without_rows == {"train": ["stray.png"], "test": []}
    assert findings.unreadable["path"].map(lambda p: Path(p).name).tolist() == ["img_0006.png"]

    run_init(root)  # the config is still written: the report says what `make folds` will refuse
    out = capsys.readouterr().out
    assert "byte-identical" in out and "different labels" in out and "have no image" in out
    report = (workdir / "runs" / "comp" / "data_report.md").read_text()
    assert "**1 test images**" in report and "test_0000" in report and "img_0003" in report
    assert "img_0001, img_0002" in report and "img_0005" in report and "stray.png" in report
    assert "img_0006.png" in report


def test_a_resized_copy_is_a_near_duplicate(workdir):
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = (rng.random((16, 16, 3)) * 255).astype(np.uint8).repeat(8, axis=0).repeat(8, axis=1)  # 128 px blocks
    Image.fromarray(photo).save(workdir / "a.png")
    Image.fromarray(photo).resize((96, 96)).save(workdir / "b.jpg", quality=80)
    Image.fromarray(np.rot90(photo).copy()).save(workdir / "c.png")
    scan = scan_images([str(workdir / n) for n in ("a.png", "b.jpg", "c.png")])
    hashes = scan["phash"].astype(np.uint64).to_numpy()
    assert near_pairs(hashes).tolist() == [[0, 1]]
    assert scan["digest"].nunique() == 3 and scan[["width", "mode", "format"]].values.tolist() == [
        [128, "RGB", "PNG"], [96, "RGB", "JPEG"], [128, "RGB", "PNG"]]


def test_names_sizes_and_quoting():
    assert config_name(Path("data/My Comp!"), None) == "My-Comp"
    assert config_name(Path("data/cassava"), "c1") == "c1"
    with pytest.raises(PipelineError, match="file-name-safe"):
        config_name(Path("x"), "a/b")
    assert image_size([150, 150, 140])[0] == 160 and image_size([1000])[0] == 320 and image_size([8])[0] == 96
    text = render(Draft(name="x", root="data/x", task="binary", id_column="id", target_columns=["label"],
                        metric="roc_auc", image_size=224, positive_class="yes"))
    raw = yaml.safe_load(text)
    assert raw["data"]["positive_class"] == "yes"  # quoted: YAML would read a bare yes as true
    assert raw["train"]["unfrozen"]["lr"] == pytest.approx(1e-4)  # a float, not the text '1e-4'


def test_make_folds_refreshes_the_report_init_wrote(workdir, capsys):
    from pipeline.stages.folds import run_folds

    root = workdir / "data" / "comp"
    write_dataset(root, "multiclass", n_train=30, n_test=6)
    cfg = load_config(run_init(root))
    report = workdir / "runs" / "comp" / "data_report.md"
    assert "**0 test images**" in report.read_text() and "test_0000" not in report.read_text()
    shutil.copyfile(root / "train" / "img_0003.png", root / "test" / "test_0000.png")  # a leak appears
    capsys.readouterr()
    run_folds(cfg)
    assert "1 test images are byte-identical to train images" in capsys.readouterr().out
    assert "test_0000" in report.read_text() and "img_0003" in report.read_text()


@pytest.mark.slow
def test_init_then_a_budgeted_make_all_gives_a_valid_submission_without_editing(workdir, capsys, one_torch_thread):
    """The issue's promise: a new competition folder, `make init`, `make all BUDGET=...`, nothing
    edited. A half-minute budget keeps it frozen-only (the preset's bundled backbones)."""
    root = workdir / "data" / "comp"
    write_dataset(root, "binary", n_train=40, n_test=8)
    assert main(["init", str(root)]) == 0
    assert main(["all", "-c", "configs/comp.yaml", "--budget", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "time budget: used" in out and "1. the frozen-only path of every backbone" in out
    sample = pd.read_csv(root / "sample_submission.csv")
    written = sorted((workdir / "submissions").glob("comp-*.csv"))
    assert written and (workdir / "submissions" / "leaderboard.csv").exists()
    for path in written:
        frame = pd.read_csv(path)
        assert list(frame.columns) == list(sample.columns) and frame[ID_COLUMN].tolist() == sample[ID_COLUMN].tolist()
        assert frame["label"].between(0, 1).all()  # binary, roc_auc: probabilities, as the sample's format
