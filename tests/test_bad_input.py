"""Bad input, full disks and leftovers (issue 12): one clear line before anything is written.

Each case builds its bad input in ``tmp_path``. A few run the real command line in a subprocess
(exit code 2, one line on stderr, no traceback, no file changed); the rest call the stage in
process, which the subprocess cases show maps to the same line and exit code.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch
from conftest import ID_COLUMN, REPO_ROOT, write_dataset
from PIL import Image

from pipeline import cli
from pipeline.config.paths import Paths
from pipeline.config.schema import config_from_dict, dump_config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError, os_error_message
from pipeline.data.tables import read_folds, read_test_table, read_train_table, task_spec
from pipeline.stages.folds import run_folds
from pipeline.stages.leaderboard import run_leaderboard
from pipeline.stages.submit import _best_cv
from pipeline.stages.train import run_train
from pipeline.training.trainer import FoldTrainer

FAST = ["train.num_workers=0", "augment.train=[]", "folds.n_splits=2"]


# ---------------------------------------------------------------------------- helpers


def _snapshot(root) -> dict:
    """Every file under ``root`` with its size and modification time: 'nothing changed' is equality."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _edit_csv(path, edit) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(frame).to_csv(path, index=False)


def _truncated_jpeg(path) -> None:
    """A real photo (scikit-learn's sample image) written as a JPEG and cut in half."""
    from sklearn.datasets import load_sample_images

    buffer = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])


def _cli(tmp_path, cfg, stage: str, *words: str, in_process: bool = False) -> subprocess.CompletedProcess:
    """``python -m pipeline <stage> -c cfg.yaml words...``; ``in_process`` calls the same ``main``
    without a new interpreter (seconds saved per case on a busy machine)."""
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))
    argv = [stage, "-c", str(config), *words]
    if in_process:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(argv)
        return subprocess.CompletedProcess(argv, code, "", err.getvalue())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(proc, *expected: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------- the command line


def _truncate_train_image(root, data):
    _truncated_jpeg(root / "train" / "img_0004.jpg")
    (root / "train" / "img_0004.png").unlink()
    return [], ["'img_0004'", "truncated"]


def _empty_sample(root, data):
    (root / "sample_submission.csv").write_text(f"{ID_COLUMN},label\n")
    return [], ["sample_submission.csv", "has a header and no rows"]


def _unknown_optimizer(root, data):
    return ["train.optimizer=adamx"], ["train.optimizer", "'adamx'", "adamax"]


def _train_csv_is_a_folder(root, data):
    (root / "folder.csv").mkdir()
    return ["data.train_csv=folder.csv"], ["folder.csv", "data.train_csv", "is a folder, not a file"]


def _one_id_two_images(root, data):
    Image.open(root / "train" / "img_0003.png").save(root / "train" / "img_0003.jpg")
    return [], ["'img_0003'", "img_0003.jpg and img_0003.png"]


def _image_over_the_pixel_limit(root, data):
    Image.new("L", (200, 200)).save(root / "train" / "img_0003.png")  # 40,000 pixels: over twice the limit
    return ["data.max_image_pixels=10000"], ["image 'img_0003' (", "img_0003.png) is 0.04 megapixels, over "
                                             "data.max_image_pixels = 10000; raise it (or set null)"]


CLI_CASES = {  # name: break the data -> (command-line overrides, texts the one line must hold)
    "1 truncated JPEG": _truncate_train_image,
    "4 sample submission without rows": _empty_sample,
    "6 unknown optimizer": _unknown_optimizer,
    "7 train_csv is a folder": _train_csv_is_a_folder,
    "10 image over data.max_image_pixels": _image_over_the_pixel_limit,
    "14 one id, two images": _one_id_two_images,
}


@pytest.fixture(autouse=True)
def _restore_pillow_limit(monkeypatch):
    """Stages set Pillow's process-wide limit from data.max_image_pixels: restore it after each test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", ""))
    if not os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"]:
        monkeypatch.delenv("OPENCV_IO_MAX_IMAGE_PIXELS")


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_folds_command_gives_one_line_and_exit_code_2(make_config, tmp_path, name):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4)
    words, expected = CLI_CASES[name](root, data)
    cfg = make_config(data=data)
    before = _snapshot(tmp_path)
    proc = _cli(tmp_path, cfg, "folds", *words, in_process=not name.startswith("1 "))  # one real subprocess
    _one_line_error(proc, *expected)
    after = _snapshot(tmp_path)
    after.pop("cfg.yaml")
    assert after == before, "the stage changed files despite bad input"


def test_train_command_refuses_a_safetensors_file_that_is_not_one(make_config, tmp_path):
    fake = tmp_path / "weights.safetensors"
    fake.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 4)
    cfg = make_config(*FAST, f"backbones.0.weights={fake}")
    run_folds(cfg)
    before = _snapshot(tmp_path)
    proc = _cli(tmp_path, cfg, "train")
    _one_line_error(proc, str(fake), "backbones[0].weights", "not a valid safetensors file")
    after = _snapshot(tmp_path)
    after.pop("cfg.yaml")
    assert after == before and not Paths(cfg).exp_dir.exists()


# ---------------------------------------------------------------------------- 1. images that do not decode


def test_a_truncated_jpeg_stops_train_before_anything_is_written(make_config, tmp_path):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4)
    cfg = make_config(*FAST, data=data)
    run_folds(cfg)
    (root / "train" / "img_0009.png").unlink()
    _truncated_jpeg(root / "train" / "img_0009.jpg")  # replaced after the folds were made
    with pytest.raises(PipelineError, match=r"cannot be read as images .*truncated.*'img_0009'"):
        run_train(cfg)
    assert not Paths(cfg).exp_dir.exists()


def test_a_truncated_test_jpeg_is_named_too(make_config, tmp_path):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4)
    (root / "test" / "test_0002.png").unlink()
    _truncated_jpeg(root / "test" / "test_0002.jpg")
    with pytest.raises(PipelineError, match=r"sample_submission.csv cannot be read .*'test_0002'"):
        read_test_table(make_config(data=data))


# ---------------------------------------------------------------------------- 2, 3. whitespace and NA-like text


def test_labels_that_differ_only_by_spaces_are_one_class(make_config, tmp_path):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=40, n_test=4)
    _edit_csv(root / "train.csv", lambda f: f.assign(label=[v + " " if n % 2 else v for n, v in enumerate(f["label"])]))
    cfg = make_config(*FAST, data=data)
    table = read_train_table(cfg)
    spec = task_spec(cfg, table)
    assert spec.classes == tuple(str(d) for d in range(10)), spec.classes
    run_folds(cfg)
    folds = read_folds(cfg)  # the folds file holds the stripped labels and still matches the train table
    assert set(folds["label"]) == {str(d) for d in range(10)}


def test_ids_that_differ_only_by_spaces_are_refused_with_quotes(make_config, tmp_path):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4)
    _edit_csv(root / "train.csv", lambda f: pd.concat([f, f.iloc[[3]].assign(**{ID_COLUMN: "img_0003 "})]))
    cfg = make_config(data=data)
    with pytest.raises(PipelineError, match=r"differ only by surrounding spaces: 'img_0003', 'img_0003 '"):
        run_folds(cfg)
    assert not Paths(cfg).folds_csv.exists()


def test_an_id_with_a_trailing_space_and_no_image_is_quoted(make_config, tmp_path):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4)
    _edit_csv(root / "train.csv", lambda f: f.assign(**{ID_COLUMN: [i + " " if n == 5 else i
                                                                   for n, i in enumerate(f[ID_COLUMN])]}))
    with pytest.raises(PipelineError, match=r"'img_0005 ' \(1 of them have surrounding spaces"):
        run_folds(make_config(data=data))


def test_none_na_null_and_nan_are_real_ids_and_labels(make_config, tmp_path, one_torch_thread):
    root = tmp_path / "data"
    data = write_dataset(root, "binary", n_train=24, n_test=4)
    names = {"img_0000": "NA", "img_0001": "null", "img_0002": "None", "img_0003": "nan"}
    for old, new in names.items():
        (root / "train" / f"{old}.png").rename(root / "train" / f"{new}.png")
    _edit_csv(root / "train.csv", lambda f: f.assign(**{ID_COLUMN: f[ID_COLUMN].replace(names),
                                                        "label": f["label"].replace({"even": "None", "odd": "NA"})}))
    cfg = make_config(*FAST, "train.unfrozen.epochs=0", data=data)
    table = read_train_table(cfg)
    assert set(names.values()) <= set(table[ID_COLUMN]) and task_spec(cfg, table).classes == ("NA", "None")
    run_folds(cfg)
    run_train(cfg)
    oof = pd.read_csv(Paths(cfg).oof_csv(cfg.backbones[0].name), dtype=str, keep_default_na=False)
    assert set(names.values()) <= set(oof[ID_COLUMN])


def test_the_leaderboard_reads_an_experiment_models_and_ids_named_like_missing_values(tmp_path):
    cfg = config_from_dict({"name": "NA", "runs_dir": str(tmp_path / "runs"), "submissions_dir": str(tmp_path / "sub"),
                            "data": {"id_column": ID_COLUMN}, "ensemble": {"methods": ["mean"]},
                            "backbones": [{"name": m, "weights": "none"} for m in ("None", "null")]})
    paths = Paths(cfg)
    for i, model in enumerate(("None", "null")):
        paths.backbone_dir(model).mkdir(parents=True)
        artifacts.write_json(paths.cv_json(model), {"metric": "accuracy", "greater_is_better": True,
                                                    "folds": [0.8 + i / 10, 0.8], "oof": 0.8})
        pd.DataFrame({ID_COLUMN: ["NA", "None", "null", "nan", "x"], "fold": [0, 1, 0, 1, 0],
                      "pred": [0.1, 0.9, 0.2 + i / 10, 0.7, 0.5]}).to_csv(paths.oof_csv(model), index=False)
    run_leaderboard(cfg)
    run_leaderboard(cfg)  # merging with its own earlier rows: replaced, not kept as another experiment's
    board = pd.read_csv(paths.leaderboard_csv, dtype=str, keep_default_na=False)
    assert board["experiment"].tolist() == ["NA", "NA"] and sorted(board["model"]) == ["None", "null"]
    assert _best_cv(cfg, "accuracy") == "best CV on the leaderboard: null 0.8500 (CV)"


# ---------------------------------------------------------------------------- 4. an empty sample submission


def test_an_empty_sample_submission_stops_train_too(make_config, tmp_path):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4)
    cfg = make_config(*FAST, data=data)
    run_folds(cfg)
    (root / "sample_submission.csv").write_text(f"{ID_COLUMN},label\n")
    with pytest.raises(PipelineError, match="has a header and no rows"):
        run_train(cfg)
    assert not Paths(cfg).exp_dir.exists()


# ---------------------------------------------------------------------------- 5. unwritable folders, full disks


def test_an_output_folder_below_a_file_is_refused_before_folds_are_computed(make_config, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    cfg = make_config(f"folds_dir={tmp_path / 'blocker' / 'folds'}")
    with pytest.raises(PipelineError, match=r"blocker is a file, not a folder.*folds_dir"):
        run_folds(cfg)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_anything_is_written(make_config, tmp_path):
    folds_dir = tmp_path / "folds"
    folds_dir.mkdir()
    folds_dir.chmod(0o555)
    try:
        with pytest.raises(PipelineError, match=r"is not writable"):
            run_folds(make_config())
    finally:
        folds_dir.chmod(0o755)


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied"),
                                        (errno.EROFS, "read-only file system")])
def test_a_full_disk_or_denied_write_mid_stage_is_one_line_and_exit_code_2(make_config, tmp_path, monkeypatch,
                                                                          capsys, code, text):
    cfg = make_config()
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))

    def fail(path, frame, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(artifacts, "write_csv", fail)
    assert cli.main(["folds", "-c", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and text in err, err
    assert str(Paths(cfg).folds_csv) in err


def test_disk_full_from_a_library_that_hides_the_oserror_is_recognised():
    line = os_error_message(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                         "message: \"No space left on device\" })"))
    assert line is not None and "no space left" in line
    assert os_error_message(ValueError("some other problem")) is None


# ---------------------------------------------------------------------------- 6, 7, 9. config checked up front


@pytest.mark.parametrize("sections, match", [
    ({"train": {"optimizer": "adamx"}}, r"'train.optimizer': 'adamx' is not a timm optimizer; did you mean: adamax"),
    ({"augment": {"train": [{"name": "HorizontalFlipp"}]}}, r"augment.train\[0\]: 'HorizontalFlipp' .*HorizontalFlip"),
    ({"augment": {"train": [{"name": "HorizontalFlip", "pp": 0.5}]}}, r"augment.train\[0\] \(HorizontalFlip\): .*'pp'"),
    ({"augment": {"train": [{"name": "Rotate", "limit": "abc"}]}}, r"augment.train\[0\] \(Rotate\): bad arguments"),
])
def test_optimizer_and_augmentations_are_checked_with_the_config(make_config, sections, match):
    with pytest.raises(PipelineError, match=match) as info:
        make_config(**sections)
    assert "\n" not in str(info.value)


def test_path_keys_say_folder_or_file(make_config, tmp_path):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4)
    (root / "test_as_file").write_text("not a folder")
    with pytest.raises(PipelineError, match=r"test_as_file .* is a file, not a folder"):
        read_test_table(make_config(data={**data, "test_dir": "test_as_file"}))
    (root / "sample_dir").mkdir()
    with pytest.raises(PipelineError, match=r"data.sample_submission\) is a folder, not a file"):
        read_test_table(make_config(data={**data, "sample_submission": "sample_dir"}))
    cfg = make_config(*FAST, f"backbones.0.weights={root}", data=data)
    run_folds(cfg)
    with pytest.raises(PipelineError, match=r"backbones\[0\].weights\) is a folder, not a file"):
        run_train(cfg)


# ---------------------------------------------------------------------------- 8. weights files


class _NotATensor:  # pickled by reference: weights_only=True refuses it
    pass


def test_a_pth_that_is_not_a_state_dict_is_refused_without_pytorchs_unsafe_advice(make_config, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": _NotATensor(), "weight": torch.zeros(1)}, path, pickle_module=pickle)
    cfg = make_config(*FAST, f"backbones.0.weights={path}")
    run_folds(cfg)
    with pytest.raises(PipelineError, match=r"model.pth .* is not a plain state dict") as info:
        run_train(cfg)
    message = str(info.value)
    assert "\n" not in message and "weights_only=False" not in message and "arbitrary pickles are refused" in message
    assert not Paths(cfg).exp_dir.exists()


# ---------------------------------------------------------------------------- 10. very large images


def test_an_image_just_over_max_image_pixels_is_one_line_without_pillows_warning(make_config, tmp_path):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4)
    Image.new("L", (120, 120)).save(root / "train" / "img_0007.png")  # 14,400: Pillow only warns below twice
    cfg = make_config(data={**data, "max_image_pixels": 10_000})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(PipelineError) as info:
            read_train_table(cfg)
    assert str(info.value) == (f"image 'img_0007' ({root / 'train' / 'img_0007.png'}) is 0.0144 megapixels, over "
                               f"data.max_image_pixels = 10000; raise it (or set null) if the image is genuine")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_several_large_images_are_counted_and_null_lifts_the_limit(make_config, tmp_path):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4)
    for i in (2, 5):
        Image.new("RGB", (200, 200)).save(root / "train" / f"img_000{i}.png")
    expected = (r"^2 images for .* are over data.max_image_pixels = 10000: 'img_0002' \(.*img_0002.png\) is 0.04 "
                r"megapixels, 'img_0005' .*if the images are genuine$")
    with pytest.raises(PipelineError, match=expected):
        read_train_table(make_config(data={**data, "max_image_pixels": 10_000}))
    table = read_train_table(make_config(data={**data, "max_image_pixels": None}))
    assert len(table) == 30 and Image.MAX_IMAGE_PIXELS is None
    assert int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"]) > 2**40  # for loader and fold processes started later
    read_train_table(make_config(data=data))  # the default: Pillow's own limit
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


def test_max_image_pixels_must_be_positive_or_null(make_config):
    with pytest.raises(PipelineError, match=r"'data.max_image_pixels': must be a positive number of pixels or null"):
        make_config("data.max_image_pixels=0")


# ---------------------------------------------------------------------------- 11. diverged validation


def _poison_validation(monkeypatch, phase_to_poison: str) -> None:
    original = FoldTrainer.end_epoch

    def poisoned(self, epoch, phase, lrs, stats, valid_logits, optimizer):
        if phase == phase_to_poison:
            valid_logits = valid_logits + float("inf")
        return original(self, epoch, phase, lrs, stats, valid_logits, optimizer)

    monkeypatch.setattr(FoldTrainer, "end_epoch", poisoned)


def test_nan_validation_outputs_stop_the_fold_and_keep_the_last_good_epoch(make_config, monkeypatch,
                                                                           one_torch_thread):
    cfg = make_config(*FAST)
    run_folds(cfg)
    _poison_validation(monkeypatch, "unfrozen")
    with pytest.raises(PipelineError, match=r"validation outputs became NaN/inf .*last good epoch \(0\) is kept"):
        run_train(cfg, fold=0)
    fold_dir = Paths(cfg).fold_dir(cfg.backbones[0].name, 0)
    history = pd.read_csv(fold_dir / "history.csv")
    assert len(history) == 1 and history["valid_loss"].notna().all()  # the diverged epoch is not recorded
    assert (fold_dir / "best.safetensors").exists() and not (fold_dir / "oof.csv").exists()


def test_divergence_in_the_first_epoch_does_not_claim_a_kept_checkpoint(make_config, monkeypatch, one_torch_thread):
    cfg = make_config(*FAST, "train.unfrozen.epochs=0")
    run_folds(cfg)
    _poison_validation(monkeypatch, "frozen")
    with pytest.raises(PipelineError, match="no epoch finished, so no checkpoint was kept") as info:
        run_train(cfg, fold=0)
    assert "last good" not in str(info.value)
    assert not (Paths(cfg).fold_dir(cfg.backbones[0].name, 0) / "best.safetensors").exists()


# ---------------------------------------------------------------------------- 13. leftover temporary files


def test_stale_temporary_files_are_removed_and_live_ones_kept(make_config, tmp_path):
    cfg = make_config()
    folder = Paths(cfg).folds_csv.parent
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder / f".{cfg.name}.csv.{dead.pid}-k1ll3d.tmp"
    live = folder / f".{cfg.name}.csv.{os.getpid()}-wr1t1ng.tmp"
    old_style = folder / f".{cfg.name}.csv.abc123xy.tmp"  # no pid in the name: stale once old
    for path in (stale, live, old_style):
        path.write_text("half a file")
    os.utime(old_style, (0, 0))
    run_folds(cfg)
    assert not stale.exists() and not old_style.exists() and live.exists()
    assert Paths(cfg).folds_csv.exists()


# ---------------------------------------------------------------------------- 14. one id, two images


def test_one_id_with_two_images_in_a_class_folder_names_both(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=30, n_test=4, layout="folders")
    png = next((tmp_path / "data" / "train").rglob("*.png"))
    Image.open(png).save(png.with_suffix(".jpg"))
    with pytest.raises(PipelineError, match=rf"{png.stem}.jpg and {png.stem}.png"):
        read_train_table(make_config(data=data))


def test_a_configured_extension_settles_which_image_an_id_means(make_config, tmp_path):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4)
    Image.open(root / "train" / "img_0003.png").save(root / "train" / "img_0003.jpg")
    table = read_train_table(make_config(data={**data, "image_extension": ".png"}))
    assert table.loc[table[ID_COLUMN] == "img_0003", "_path"].item().endswith("img_0003.png")
