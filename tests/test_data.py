"""Data: both train layouts, ids with or without extension, every bad input as a clear error with
nothing written, target encoding for every task type, and the digits demo data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import ID_COLUMN, write_dataset, write_png

from pipeline.config.paths import Paths
from pipeline.core.errors import PipelineError
from pipeline.data.datasets import ImageDataset
from pipeline.data.images import PATH, load_image
from pipeline.data.tables import read_folds, read_test_table, read_train_table, task_spec
from pipeline.domain.tasks import TaskSpec
from pipeline.stages.demo_data import run_demo_data
from pipeline.stages.folds import run_folds


def _nothing_written(cfg) -> None:
    out = Paths(cfg).folds_csv
    assert not out.exists(), f"{out} was written despite bad input"
    assert not (out.parent / f".{out.name}.stamp").exists()


def _edit_csv(path, edit) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame = edit(frame)
    frame.to_csv(path, index=False)


# ---------------------------------------------------------------------------- layouts


def test_train_and_test_tables_of_the_shared_digits(make_config, digits_root):
    cfg = make_config()
    train = read_train_table(cfg)
    assert list(train.columns) == [ID_COLUMN, "label", "writer", PATH]
    assert len(train) == 200 and train[ID_COLUMN].is_unique
    assert train[PATH].tolist() == [str(digits_root / "train" / f"{i}.png") for i in train[ID_COLUMN]]
    test = read_test_table(cfg)
    sample = pd.read_csv(digits_root / "sample_submission.csv", dtype=str)
    assert list(test.columns) == [ID_COLUMN, PATH]
    assert test[ID_COLUMN].tolist() == sample[ID_COLUMN].tolist()  # the sample submission's order
    assert all(p.endswith(".png") for p in test[PATH])


def test_ids_with_and_without_extension_resolve_to_the_same_images(make_config, tmp_path):
    bare = make_config(data=write_dataset(tmp_path / "bare", "multiclass", n_train=20, n_test=5))
    ext = make_config(data=write_dataset(tmp_path / "ext", "multiclass", n_train=20, n_test=5, id_extension=True))
    for read in (read_train_table, read_test_table):
        a, b = read(bare), read(ext)
        assert (b[ID_COLUMN] == a[ID_COLUMN] + ".png").all()
        assert [p.replace("/ext/", "/bare/") for p in b[PATH]] == a[PATH].tolist()


def test_mixed_ids_dotted_stems_and_configured_extension(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=10, n_test=2)
    write_png(tmp_path / "data" / "train" / "scan.v2.png", np.zeros((8, 8), np.uint8))
    _edit_csv(tmp_path / "data" / "train.csv", lambda f: pd.concat(
        [f.assign(**{ID_COLUMN: [i + ".png" if n % 2 else i for n, i in enumerate(f[ID_COLUMN])]}),
         pd.DataFrame({ID_COLUMN: ["scan.v2"], "label": ["3"], "writer": ["w9"]})]))
    for extension in ("null", ".png", "png"):
        table = read_train_table(make_config(f"data.image_extension={extension}", data=data))
        assert len(table) == 11
        assert table.loc[table[ID_COLUMN] == "scan.v2", PATH].item().endswith("/train/scan.v2.png")
        assert table.loc[table[ID_COLUMN] == "img_0001.png", PATH].item().endswith("/train/img_0001.png")


def test_class_subfolder_layout_reads_into_the_same_table(make_config, tmp_path):
    csv = make_config(data=write_dataset(tmp_path / "csv", "multiclass", n_train=40, n_test=4))
    folders = make_config(data=write_dataset(tmp_path / "folders", "multiclass", n_train=40, n_test=4,
                                             layout="folders"))
    a, b = read_train_table(csv), read_train_table(folders)
    assert list(b.columns) == [ID_COLUMN, "label", PATH]
    assert len(a) == len(b) == 40 and b[ID_COLUMN].is_unique
    assert (b[ID_COLUMN] == b["label"] + "/" + b[PATH].str.rsplit("/", n=1).str[-1].str[:-4]).all()
    by_stem = lambda t: dict(zip(t[PATH].str.rsplit("/", n=1).str[-1], t["label"]))  # noqa: E731
    assert by_stem(a) == by_stem(b)  # every image, same class
    spec_a, spec_b = task_spec(csv, a), task_spec(folders, b)
    assert spec_a.classes == spec_b.classes
    run_folds(folders)
    folds = read_folds(folders)
    assert set(folds[ID_COLUMN]) == set(b[ID_COLUMN]) and set(folds["fold"]) == {0, 1, 2}


def test_class_subfolder_layout_without_class_folders_is_an_error(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=10, n_test=2)  # flat train/
    cfg = make_config("data.train_csv=null", data=data)
    with pytest.raises(PipelineError, match="no class sub-folders"):
        run_folds(cfg)
    _nothing_written(cfg)


def test_read_folds_joins_paths_and_detects_a_changed_train_table(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=30, n_test=2)
    cfg = make_config(data=data)
    with pytest.raises(PipelineError, match="run `make folds"):
        read_folds(cfg)  # not written yet
    run_folds(cfg)
    folds = read_folds(cfg)
    assert list(folds.columns) == [ID_COLUMN, "label", "fold", PATH] and folds["fold"].dtype.kind == "i"
    _edit_csv(tmp_path / "data" / "train.csv", lambda f: f.iloc[1:])
    with pytest.raises(PipelineError, match="does not match the train table.*make folds"):
        read_folds(cfg)


def test_read_folds_refuses_a_label_corrected_after_the_folds_were_made(make_config, tmp_path):
    """The folds file carries the targets every stage trains on: a corrected label in train.csv must
    not be silently trained on with its old value."""
    data = write_dataset(tmp_path / "data", "binary", n_train=30, n_test=2)
    cfg = make_config(data=data)
    run_folds(cfg)
    fixed = lambda f: f.assign(label=np.where(f[ID_COLUMN].isin(["img_0003", "img_0008"]),  # noqa: E731
                                              "even", f["label"]))
    _edit_csv(tmp_path / "data" / "train.csv", fixed)  # img_0003 was 'odd'; img_0008 stays 'even'
    with pytest.raises(PipelineError) as err:
        read_folds(cfg)
    message = str(err.value)
    assert "\n" not in message and "is stale: column 'label' differs" in message and "for 1 rows" in message
    assert "'img_0003'" in message and "'odd' in the folds file, 'even' in the train table" in message
    assert "make folds CONFIG=... ARGS=--force" in message and "python -m pipeline folds -c CFG --force" in message
    run_folds(cfg, force=True)
    assert read_folds(cfg).set_index(ID_COLUMN).loc["img_0003", "label"] == "even"


def test_read_folds_refuses_changed_groups_and_quotes_ids_with_spaces(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=30, n_test=2, group=True)
    cfg = make_config("folds.strategy=group", data=data)
    run_folds(cfg)
    folds_csv = Paths(cfg).folds_csv
    for path in (tmp_path / "data" / "train.csv", folds_csv):  # an id with a trailing space, in both files
        _edit_csv(path, lambda f: f.replace({ID_COLUMN: {"img_0004": "img_0004 "}}))
    (tmp_path / "data" / "train" / "img_0004.png").rename(tmp_path / "data" / "train" / "img_0004 .png")
    read_folds(cfg)  # still current
    _edit_csv(tmp_path / "data" / "train.csv",
              lambda f: f.assign(writer=np.where(f[ID_COLUMN] == "img_0004 ", "w999", f["writer"])))
    with pytest.raises(PipelineError, match=r"column 'writer' differs .* ids 'img_0004 ' \(id 'img_0004 ': 'w000'"):
        read_folds(cfg)
    _edit_csv(folds_csv, lambda f: f.drop(columns=["writer"]))
    with pytest.raises(PipelineError, match="no group column 'writer' .*--force"):
        read_folds(cfg)


def test_per_row_seeding_without_compose_set_random_seed_fails_loudly(monkeypatch, tmp_path):
    """Per-row augmentation seeding needs albumentations >= 1.4.21; an older one must not be
    skipped silently (a resumed run would then differ from an uninterrupted one)."""
    import albumentations

    from pipeline.data.datasets import SeededSampler

    image = write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    unseedable = lambda image: {"image": image}  # noqa: E731  (a transform without set_random_seed)
    with pytest.raises(PipelineError, match=r"needs albumentations >= 1\.4\.21 \(Compose.set_random_seed\)"):
        ImageDataset([str(image)], targets=[0], transform=unseedable)[(0, 123)]
    assert ImageDataset([str(image)], targets=[0], transform=unseedable)[0][1] == 0  # unseeded: fine
    monkeypatch.setattr(albumentations, "Compose", type("Compose", (), {}))  # as in albumentations < 1.4.21
    with pytest.raises(PipelineError, match=r"installed albumentations .*pip install 'albumentations>=1\.4\.21'"):
        SeededSampler(4)


# ---------------------------------------------------------------------------- bad input


def _missing_image(root):
    (root / "train" / "img_0007.png").unlink()
    (root / "train" / "img_0012.png").unlink()


def _garbage_image(root):
    (root / "train" / "img_0011.png").write_bytes(b"\x89PNG this is not really a png" * 3)


def _duplicate_id(root):
    _edit_csv(root / "train.csv", lambda f: pd.concat([f, f.iloc[[3]]]))


def _empty_id(root):
    _edit_csv(root / "train.csv", lambda f: f.assign(**{ID_COLUMN: ["" if n == 6 else i
                                                                   for n, i in enumerate(f[ID_COLUMN])]}))


def _nan_target(root):
    _edit_csv(root / "train.csv", lambda f: f.assign(label=["" if n == 5 else v for n, v in enumerate(f["label"])]))


def _nan_text_target(root):
    _edit_csv(root / "train.csv", lambda f: f.assign(label=["NaN" if n == 8 else v for n, v in enumerate(f["label"])]))


def _rare_class(root):
    _edit_csv(root / "train.csv", lambda f: f.assign(label=["x" if n == 9 else v for n, v in enumerate(f["label"])]))


def _no_train_csv(root):
    (root / "train.csv").unlink()


def _no_train_dir(root):
    for p in (root / "train").iterdir():
        p.unlink()
    (root / "train").rmdir()


def _not_a_csv(root):
    (root / "train.csv").write_bytes(b'image_id,label\n"unterminated,1\n')


BAD_INPUTS = {  # name: (break the data, config overrides, error must match)
    "missing image": (_missing_image, [], r"2 ids .* have no image .*'img_0007', 'img_0012'"),
    "unreadable image": (_garbage_image, [], r"cannot be read as images .*: 'img_0011'"),
    "duplicate id": (_duplicate_id, [], r"duplicate ids in column 'image_id': 'img_0003'"),
    "empty id": (_empty_id, [], r"empty id in column 'image_id' at lines 8"),
    "missing id column": (None, ["data.id_column=id"], r"no column id \(config key data.id_column\).*image_id"),
    "missing target column": (None, ["data.target_columns=[labels]"], r"no column labels.*data.target_columns"),
    "NaN target": (_nan_target, [], r"target column 'label' is empty for 1 rows, ids 'img_0005'"),
    "NaN text target is a label": (_nan_text_target, [], r"too few for: .*class 'NaN' \(1 rows\)"),
    "class with fewer rows than folds": (_rare_class, [],
                                         r"at least folds.n_splits=3 rows per class; "
                                         r"too few for: .*class 'x' \(1 rows\)"),
    "missing group column": (None, ["data.group_column=author", "folds.strategy=group"],
                             r"no column author \(config key data.group_column\)"),
    "missing train.csv": (_no_train_csv, [], r"train table .*train.csv \(config key data.train_csv\) does not exist"),
    "missing train folder": (_no_train_dir, [], r"image folder .*train does not exist"),
    "malformed train.csv": (_not_a_csv, [], r"could not be read as CSV"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_train_input_is_a_clear_error_and_nothing_is_written(make_config, tmp_path, name):
    breaker, overrides, match = BAD_INPUTS[name]
    data = write_dataset(tmp_path / "data", "multiclass", n_train=30, n_test=4)
    if breaker:
        breaker(tmp_path / "data")
    cfg = make_config(*overrides, data=data)
    with pytest.raises(PipelineError, match=match):
        run_folds(cfg)
    _nothing_written(cfg)
    assert not Paths(cfg).folds_csv.parent.exists() or not any(Paths(cfg).folds_csv.parent.iterdir())


def test_empty_group_value_is_an_error(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=30, n_test=4, group=True)
    _edit_csv(tmp_path / "data" / "train.csv", lambda f: f.assign(writer=["" if n == 2 else w
                                                                         for n, w in enumerate(f["writer"])]))
    cfg = make_config("folds.strategy=group", data=data)
    with pytest.raises(PipelineError, match="group column 'writer' is empty for ids 'img_0002'"):
        run_folds(cfg)
    _nothing_written(cfg)


def test_non_numeric_regression_target_is_an_error(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "regression", n_train=30, n_test=4)
    _edit_csv(tmp_path / "data" / "train.csv",
              lambda f: f.assign(target=["n/a?" if n == 4 else v for n, v in enumerate(f["target"])]))
    cfg = make_config("metric=rmse", data=data)
    with pytest.raises(PipelineError, match="not numeric"):
        run_folds(cfg)
    _nothing_written(cfg)


def test_non_binary_multilabel_column_is_a_clear_error(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multilabel_columns", n_train=30, n_test=4)
    _edit_csv(tmp_path / "data" / "train.csv", lambda f: f.assign(odd=["yes" if n == 4 else v
                                                                       for n, v in enumerate(f["odd"])]))
    cfg = make_config("metric=roc_auc", data=data)
    with pytest.raises(PipelineError, match="odd.*img_0004"):
        run_folds(cfg)
    _nothing_written(cfg)


def test_sample_submission_ids_without_images_are_listed(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=30, n_test=8)
    (tmp_path / "data" / "test" / "test_0002.png").unlink()
    _edit_csv(tmp_path / "data" / "sample_submission.csv",
              lambda f: pd.concat([f, pd.DataFrame({ID_COLUMN: ["ghost"], "label": ["0"]})]))
    cfg = make_config(data=data)
    with pytest.raises(PipelineError, match=r"2 ids in .*sample_submission.csv have no image .*'test_0002', 'ghost'"):
        read_test_table(cfg)
    _nothing_written(cfg)


def test_folds_stage_rejects_sample_submission_ids_without_images(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=30, n_test=8)
    (tmp_path / "data" / "test" / "test_0002.png").unlink()
    cfg = make_config(data=data)
    with pytest.raises(PipelineError, match="test_0002"):
        run_folds(cfg)
    _nothing_written(cfg)


def test_unreadable_test_image_and_duplicate_test_ids_are_errors(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=30, n_test=8)
    (tmp_path / "data" / "test" / "test_0003.png").write_bytes(b"garbage")
    cfg = make_config(data=data)
    with pytest.raises(PipelineError, match="cannot be read as images .*: 'test_0003'"):
        read_test_table(cfg)
    assert len(read_test_table(cfg, check_readable=False)) == 8
    _edit_csv(tmp_path / "data" / "sample_submission.csv", lambda f: pd.concat([f, f.iloc[[1]]]))
    with pytest.raises(PipelineError, match="duplicate ids.*test_0001"):
        read_test_table(cfg)


def test_load_image_gives_rgb_and_names_an_unreadable_file(tmp_path):
    good = write_png(tmp_path / "good.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    image = load_image(str(good))
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert (image[..., 0] == np.arange(64).reshape(8, 8)).all()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(PipelineError, match="bad.png cannot be read"):
        load_image(str(bad))
    dataset = ImageDataset([str(good)], targets=[3])
    pixels, target = dataset[0]
    assert len(dataset) == 1 and pixels.shape == (8, 8, 3) and target == 3


# ---------------------------------------------------------------------------- task encoding


def test_multiclass_encoding_orders_numeric_classes_numerically():
    table = pd.DataFrame({"id": list("abcd"), "label": ["10", "2", "2", "1"]})
    spec = TaskSpec.from_table(table, "multiclass", ["label"])
    assert spec.classes == ("1", "2", "10")
    assert spec.num_outputs == 3 and spec.pred_columns == ["pred_1", "pred_2", "pred_10"]
    codes = spec.encode(table)
    assert codes.dtype == np.int64 and codes.tolist() == [2, 1, 1, 0]
    assert spec.strata(table).tolist() == [2, 1, 1, 0]


def test_multiclass_encoding_with_fixed_classes_and_unknown_values():
    table = pd.DataFrame({"label": ["dog", "cat", "dog"]})
    spec = TaskSpec.from_table(table, "multiclass", ["label"], classes=["dog", "cat", "bird"])
    assert spec.classes == ("dog", "cat", "bird") and spec.encode(table).tolist() == [0, 1, 0]
    with pytest.raises(PipelineError, match="unknown classes fox"):
        spec.encode(pd.DataFrame({"label": ["cat", "fox"]}))
    with pytest.raises(PipelineError, match="not in data.classes: cow"):
        TaskSpec.from_table(pd.DataFrame({"label": ["cow", "cat"]}), "multiclass", ["label"], classes=["cat", "dog"])
    with pytest.raises(PipelineError, match="at least 2 classes"):
        TaskSpec.from_table(pd.DataFrame({"label": ["cat", "cat"]}), "multiclass", ["label"])


def test_binary_encoding():
    table = pd.DataFrame({"label": ["odd", "even", "odd"]})
    spec = TaskSpec.from_table(table, "binary", ["label"])
    assert spec.classes == ("even", "odd") and spec.num_outputs == 1 and spec.pred_columns == ["pred"]
    y = spec.encode(table)
    assert y.dtype == np.float32 and y.tolist() == [1.0, 0.0, 1.0]
    assert spec.strata(table).dtype.kind == "i"
    with pytest.raises(PipelineError, match="exactly 2 distinct values.*found 3"):
        TaskSpec.from_table(pd.DataFrame({"label": ["a", "b", "c"]}), "binary", ["label"])


def test_multilabel_text_encoding_with_empty_cells_and_a_custom_separator():
    table = pd.DataFrame({"labels": ["round small", "", None, "odd", "small odd"]})
    spec = TaskSpec.from_table(table, "multilabel", ["labels"])
    assert spec.classes == ("odd", "round", "small") and spec.pred_columns == ["pred_odd", "pred_round", "pred_small"]
    y = spec.encode(table)
    assert y.dtype == np.float32
    assert y.tolist() == [[0, 1, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 1]]
    comma = pd.DataFrame({"tags": ["a,b", "b"]})
    spec = TaskSpec.from_table(comma, "multilabel", ["tags"], label_separator=",")
    assert spec.classes == ("a", "b") and spec.encode(comma).tolist() == [[1, 1], [0, 1]]


def test_multilabel_encoding_of_an_unknown_label_is_a_clear_error():
    spec = TaskSpec.from_table(pd.DataFrame({"labels": ["a b", "b"]}), "multilabel", ["labels"])
    with pytest.raises(PipelineError, match="unknown.*c"):
        spec.encode(pd.DataFrame({"labels": ["a c"]}))


def test_multilabel_column_encoding():
    table = pd.DataFrame({"cat": ["1", "0", "1"], "dog": ["0", "0", "1"]})  # as read from CSV: text
    spec = TaskSpec.from_table(table, "multilabel", ["cat", "dog"])
    assert spec.classes == ("cat", "dog") and spec.num_outputs == 2 and spec.pred_columns == ["pred_cat", "pred_dog"]
    y = spec.encode(table)
    assert y.dtype == np.float32 and y.tolist() == [[1, 0], [0, 0], [1, 1]]


def test_regression_encoding():
    table = pd.DataFrame({"target": ["1.5", "-2", "3e1"]})
    spec = TaskSpec.from_table(table, "regression", ["target"])
    assert spec.num_outputs == 1 and spec.pred_columns == ["pred"] and spec.classes == ()
    y = spec.encode(table)
    assert y.dtype == np.float32 and y.tolist() == [1.5, -2.0, 30.0]
    with pytest.raises(PipelineError, match="not numeric"):
        spec.encode(pd.DataFrame({"target": ["1", "abc"]}))
    with pytest.raises(PipelineError, match="one target column"):
        TaskSpec.from_table(pd.DataFrame({"a": [1], "b": [2]}), "regression", ["a", "b"])


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel", "multilabel_columns", "regression"])
def test_task_spec_from_written_datasets_and_activation(make_config, tmp_path, task):
    data = write_dataset(tmp_path / "data", task, n_train=30, n_test=4)
    cfg = make_config(data=data)
    table = read_train_table(cfg, check_readable=False)
    spec = task_spec(cfg, table)
    y = spec.encode(table)
    assert len(y) == 30 and np.isfinite(y).all()
    logits = np.random.default_rng(0).normal(size=(30, spec.num_outputs))
    preds = spec.activate(logits)
    frame = spec.predictions_frame(table[ID_COLUMN], preds, ID_COLUMN)
    assert list(frame.columns) == [ID_COLUMN, *spec.pred_columns]
    back = spec.predictions_from_frame(frame)
    np.testing.assert_allclose(back, preds)
    if data["task"] == "multiclass":
        np.testing.assert_allclose(preds.sum(axis=1), 1.0)
    if data["task"] in ("binary", "multilabel", "multiclass"):
        assert ((preds > 0) & (preds < 1)).all()
    with pytest.raises(PipelineError, match="lacks prediction columns"):
        spec.predictions_from_frame(frame[[ID_COLUMN]])


# ---------------------------------------------------------------------------- demo data


def test_demo_data_writes_kaggle_layout_and_is_skipped_on_rerun(make_config, tmp_path, capsys):
    root = tmp_path / "data" / "digits"
    assert run_demo_data(root) == root
    assert "1437 train, 360 test" in capsys.readouterr().out
    train = pd.read_csv(root / "train.csv", dtype=str)
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str)
    solution = pd.read_csv(root / "solution.csv", dtype=str)
    assert list(train.columns) == list(sample.columns) == list(solution.columns) == ["image_id", "label"]
    assert (len(train), len(sample), len(solution)) == (1437, 360, 360)
    assert (sample["label"] == "0").all() and solution["image_id"].tolist() == sample["image_id"].tolist()
    assert set(train["label"]) == set(solution["label"]) == {str(d) for d in range(10)}
    assert not set(train["image_id"]) & set(sample["image_id"])
    assert not train["image_id"].str.contains(r"\.").any()  # ids without extension
    assert len(list((root / "train").glob("*.png"))) == 1437 and len(list((root / "test").glob("*.png"))) == 360

    cfg = make_config(f"data.root={root}")  # demo.yaml's data section reads it as is
    assert len(read_train_table(cfg)) == 1437 and len(read_test_table(cfg)) == 360
    assert load_image(read_train_table(cfg, check_readable=False)[PATH][0]).shape == (8, 8, 3)

    stamp = (root / "train.csv").stat().st_mtime_ns
    run_demo_data(root)
    assert "up to date" in capsys.readouterr().out
    assert (root / "train.csv").stat().st_mtime_ns == stamp


def test_images_are_decoded_once_per_unchanged_file_set(make_config, tmp_path, monkeypatch):
    """A checked image set is stamped under runs/.verified: re-reading the same files decodes
    nothing, and a changed file (new size or time) is decoded again."""
    from conftest import write_dataset

    import pipeline.data.images as data_mod
    from pipeline.data.tables import read_train_table

    cfg = make_config(data=write_dataset(tmp_path / "d", n_train=20, n_test=4))
    table = read_train_table(cfg)
    data_mod.record_verified(table, data_mod.verified_dir(cfg))  # what run_train does once all is valid
    decoded = []
    real = data_mod._image_problem
    monkeypatch.setattr(data_mod, "_image_problem", lambda p: (decoded.append(p), real(p))[1])
    read_train_table(cfg)
    assert decoded == []
    image = tmp_path / "d" / "train" / "img_0003.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # now truncated
    with pytest.raises(PipelineError, match="img_0003"):
        read_train_table(cfg)
    assert len(decoded) == 20
