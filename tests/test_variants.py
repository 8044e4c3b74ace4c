"""Model variants (``backbones[].id``, per-entry overrides, ``seeds:``), the predict stage and the
Kaggle bundle, on one tiny experiment trained once for the module.

The experiment: ``test_efficientnet`` at 32 px (id ``small``) and at 40 px with its own unfrozen
epochs and TTA (id ``large``), and a two-seed ``test_resnet`` entry (``res-s1``, ``res-s2``,
averaged as ``res``); 3 folds of the digits, every ensemble method.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import shrunk_raw_config
from PIL import Image

from pipeline.config.paths import Paths
from pipeline.config.schema import config_from_dict, load_config
from pipeline.core.errors import PipelineError
from pipeline.data.tables import read_test_table
from pipeline.ensembles.inference import predict_frame
from pipeline.stages.ensemble import run_ensemble
from pipeline.stages.folds import run_folds
from pipeline.stages.leaderboard import run_leaderboard
from pipeline.stages.predict import run_predict
from pipeline.stages.train import run_train

pytestmark = pytest.mark.slow

ENTRIES = [
    {"name": "test_efficientnet", "id": "small", "weights": "none", "image_size": 32},
    {"name": "test_efficientnet", "id": "large", "weights": "none", "image_size": 40,
     "train": {"unfrozen": {"epochs": 2}}, "augment": {"tta": ["identity", "hflip"]}},
    {"name": "test_resnet", "id": "res", "weights": "none", "image_size": 32, "seeds": [1, 2]},
]


def _raw(digits_root: Path, tmp: Path) -> dict:
    raw = shrunk_raw_config(digits_root, tmp)
    raw["backbones"] = copy.deepcopy(ENTRIES)
    raw["ensemble"]["methods"] = ["mean", "weighted", "hill_climb", "rank", "stacking"]
    return raw


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_root):
    """The experiment above after folds, train and ensemble (about a minute on two CPU cores)."""
    tmp = tmp_path_factory.mktemp("variants")
    raw = _raw(digits_root, tmp)
    cfg = config_from_dict(raw)
    run_folds(cfg)
    run_train(cfg)
    run_ensemble(cfg)
    return cfg, raw, tmp


def test_seeds_and_overrides_expand_into_variants(digits_root, tmp_path):
    cfg = config_from_dict(_raw(digits_root, tmp_path))
    assert [b.slug for b in cfg.backbones] == ["small", "large", "res-s1", "res-s2"]
    assert list(cfg.seed_groups()) == ["res"] and list(cfg.models()) == ["small", "large", "res"]
    small, large, s1, s2 = (cfg.variant(b)[0] for b in cfg.backbones)
    # an entry's overrides change its own resolved config only
    assert large.train.unfrozen.epochs == 2 and large.augment.tta == ["identity", "hflip"]
    assert small.train.unfrozen.epochs == 1 and small.augment.tta == ["identity"] == s1.augment.tta
    assert (s1.train.seed, s2.train.seed, small.train.seed) == (1, 2, 42)


@pytest.mark.parametrize("entry, message", [
    ({"name": "test_efficientnet", "weights": "none"}, "model ids must be unique"),
    ({"name": "test_resnet", "id": "bad/id", "weights": "none"}, "file-name-safe"),
    ({"name": "test_resnet", "id": "mean", "weights": "none"}, "ensemble method"),
    ({"name": "test_resnet", "id": "x", "weights": "none", "train": {"unfrozen": {"epoks": 1}}},
     "backbones[1].train.unfrozen.epoks"),
])
def test_bad_variants_are_refused_naming_the_key(digits_root, tmp_path, entry, message):
    raw = shrunk_raw_config(digits_root, tmp_path)
    raw["backbones"] = [{"name": "test_efficientnet", "weights": "none"}, entry]
    with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(raw)


def test_variants_train_into_their_own_folders_and_rows(trained):
    cfg, _, _ = trained
    paths = Paths(cfg)
    for model in ("small", "large", "res-s1", "res-s2", "res"):
        assert paths.cv_json(model).exists() and paths.test_csv(model).exists()
    large = pd.read_csv(paths.fold_dir("large", 0) / "history.csv")
    assert (large["phase"] == "unfrozen").sum() == 2  # its own override, not the shared 1
    # the seed-mean model is the mean of its seeds' predictions
    s1, s2, mean = (pd.read_csv(paths.oof_csv(m)).filter(like="pred_").to_numpy() for m in ("res-s1", "res-s2", "res"))
    assert not np.allclose(s1, s2)  # two seeds, two models
    np.testing.assert_allclose(mean, (s1 + s2) / 2, atol=1e-9)
    # ensembles blend the seed-mean as one model (ensemble.seed_mean: true)
    assert paths.ensemble_method_dir("mean").joinpath("params.json").exists()
    assert yaml.safe_load(paths.ensemble_method_dir("mean").joinpath("params.json").read_text())["models"] == \
        ["small", "large", "res"]
    board = pd.read_csv(run_leaderboard(cfg))
    assert {"small", "large", "res-s1", "res-s2", "res", "hill_climb"} <= set(board["model"])


@pytest.mark.parametrize("method", ["hill_climb", "stacking", "rank", "large"])
def test_predict_reproduces_the_ensemble_stage(trained, method, tmp_path):
    cfg, _, _ = trained
    paths = Paths(cfg)
    out = run_predict(cfg, method=method, out=str(tmp_path / "predicted.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(paths.submission(method)))
    # and every probability, not only the labels
    frame, _, _ = predict_frame(cfg, method, read_test_table(cfg))
    written = pd.read_csv(paths.ensemble_method_dir(method) / "test.csv" if method != "large"
                          else paths.test_csv(method))
    np.testing.assert_allclose(frame.iloc[:, 1:].to_numpy(float), written.iloc[:, 1:].to_numpy(float), atol=1e-6)


def test_predict_on_another_test_folder(trained, tmp_path):
    cfg, _, _ = trained
    paths = Paths(cfg)
    sample = pd.read_csv(paths.sample_submission).head(5)
    folder = tmp_path / "hidden"
    folder.mkdir()
    for image in sample.iloc[:, 0]:
        src = next(paths.test_dir.glob(f"{image}*"))
        (folder / src.name).write_bytes(src.read_bytes())
    sample.to_csv(tmp_path / "sample.csv", index=False)
    out = run_predict(cfg, test_dir=str(folder), sample=str(tmp_path / "sample.csv"), method="mean",
                      out=str(tmp_path / "hidden.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(paths.submission("mean")).head(5))


def test_a_checkpoint_from_another_config_is_refused_with_the_differences(trained, tmp_path, monkeypatch):
    cfg, raw, _ = trained
    changed = copy.deepcopy(raw)
    changed["backbones"][0]["image_size"] = 48
    changed["augment"]["resize"] = "pad"
    changed["train"]["label_smoothing"] = 0.1
    with pytest.raises(PipelineError) as err:
        run_predict(config_from_dict(changed), method="small")
    message = str(err.value)
    assert "backbone.image_size: checkpoint 32, config 48" in message
    assert "augment.resize: checkpoint 'crop', config 'pad'" in message and "\n" not in message
    assert "train.label_smoothing: checkpoint 0.05, config 0.1" in message
    # run-only keys (pipeline.config.run_only) change how a run goes, not the weights: the checkpoint is
    # taken, a time budget's too (the checkpoint's config holds the epochs it planned)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # data.max_image_pixels sets it
    run_only = copy.deepcopy(raw)
    run_only["train"].update(compile=True, cache_images=True, cache_features=False, channels_last=False,
                             num_workers=0, device="cpu", use_tuned="false", time_budget_min=600.0,
                             deterministic=True)
    run_only["data"]["max_image_pixels"] = 10**8
    run_only["submission"]["competition"] = "some-competition"
    run_only["tune"]["storage"] = f"sqlite:///{tmp_path / 'study.db'}"
    run_only["tracking"] = {"backend": "tensorboard", "uri": str(tmp_path / "tracking")}
    out = run_predict(config_from_dict(run_only), method="small", out=str(tmp_path / "run_only.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(Paths(cfg).submission("small")))


def test_bundle_predicts_offline_without_the_project(trained, tmp_path):
    """The bundle as Kaggle runs it: another working directory, no network, the project's editable
    install and source removed from the import system; its submission equals `predict`'s."""
    from pipeline.stages.bundle import run_bundle

    cfg, _, _ = trained
    paths = Paths(cfg)
    bundle = run_bundle(cfg, method="hill_climb", out=str(tmp_path / "bundle"))
    assert (bundle / "dataset-metadata.json").exists() and list(bundle.glob("pipeline-*.whl"))
    expected = run_predict(cfg, method="hill_climb", out=str(tmp_path / "expected.csv"))
    project = str(Path(__file__).resolve().parent.parent)
    runner = tmp_path / "kaggle_notebook.py"
    runner.write_text(
        "import runpy, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {project!r})]\n"
        "sys.modules.pop('pipeline', None)\n"
        f"sys.argv = ['predict.py', '--test-dir', {str(paths.test_dir)!r}, '--sample', "
        f"{str(paths.sample_submission)!r}, '--out', 'submission.csv']\n"
        "try:\n"
        f"    runpy.run_path({str(bundle / 'predict.py')!r}, run_name='__main__')\n"
        "finally:\n"
        "    import pipeline\n"
        "    print('pipeline from', pipeline.__file__)\n"
        "    print('optuna imported:', 'optuna' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", HTTP_PROXY="http://0.0.0.0:9", HTTPS_PROXY="http://0.0.0.0:9", NO_PROXY="")
    work = tmp_path / "kaggle_working"
    work.mkdir()
    done = subprocess.run([sys.executable, "-I", str(runner)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"pipeline from {bundle}" in done.stdout and ".whl" in done.stdout, done.stdout
    assert "optuna imported: False" in done.stdout
    pd.testing.assert_frame_equal(pd.read_csv(work / "submission.csv"), pd.read_csv(expected))


def test_image_size_placeholder_takes_each_variants_size():
    from pipeline.domain.transforms import train_transform

    spec = [{"name": "RandomResizedCrop", "size": ["{image_size}", "{image_size}"], "scale": [0.5, 1.0]}]
    image = np.zeros((100, 80, 3), np.uint8)
    for size in (32, 40):
        assert tuple(train_transform(spec, size, "bilinear")(image=image)["image"].shape) == (3, size, size)


def test_fp16_bundle_halves_the_weights(trained, tmp_path):
    from pipeline.stages.bundle import run_bundle

    cfg, _, _ = trained
    full = run_bundle(cfg, method="large", out=str(tmp_path / "fp32"))
    half = run_bundle(cfg, method="large", fp16=True, out=str(tmp_path / "fp16"))
    size = lambda root: sum(f.stat().st_size for f in root.rglob("best.safetensors"))  # noqa: E731
    assert 0.45 < size(half) / size(full) < 0.55
    assert [p.name for p in (half / "runs" / cfg.name).iterdir()] == ["large"]  # only the models the choice uses


@pytest.mark.parametrize("unfreeze", ["never", "auto"])
def test_a_resolved_unfreeze_predicts_and_bundles(digits_root, tmp_path, unfreeze, one_torch_thread):
    """``never`` and a decided ``auto`` train folds whose own config says ``always`` (with 0 unfrozen
    epochs when frozen-only): predicting from them and bundling them compare the checkpoint with
    the config as the train stage resolved it, in the project and inside the bundle."""
    from pipeline.stages.bundle import predict_from_bundle, run_bundle

    raw = shrunk_raw_config(digits_root, tmp_path)
    raw["train"]["unfreeze"] = unfreeze
    raw["ensemble"]["methods"] = ["mean"]
    cfg = config_from_dict(raw)
    run_folds(cfg)
    run_train(cfg)
    run_ensemble(cfg)
    paths = Paths(cfg)
    trained = load_config(paths.fold_dir("test_efficientnet", 1) / "config.yaml")
    assert trained.train.unfreeze == "always"
    # augment.frozen_zoom: frozen-only folds predicted through zoom too, fine-tuned ones through augment.tta
    assert trained.augment.tta == (["identity", "zoom"] if trained.train.unfrozen.epochs == 0 else ["identity"])
    expected = run_predict(cfg, method="mean", out=str(tmp_path / "expected.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(expected), pd.read_csv(paths.submission("mean")))
    bundle = run_bundle(cfg, method="mean", out=str(tmp_path / "bundle"))
    assert (bundle / "runs" / cfg.name / "test_efficientnet" / "unfreeze.json").exists() == (unfreeze == "auto")
    out = tmp_path / "from_bundle.csv"
    assert predict_from_bundle(bundle, str(paths.test_dir), str(paths.sample_submission), str(out), "mean") == 0
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(expected))
    # a changed rule is not the decision the folds were trained under: refused, with the difference
    changed = copy.deepcopy(raw)
    changed["train"]["unfreeze_alpha"] = 0.2
    if unfreeze == "auto":
        with pytest.raises(PipelineError, match="train.unfreeze: checkpoint 'always', config 'auto'"):
            run_predict(config_from_dict(changed), method="mean", out=str(tmp_path / "x.csv"))
