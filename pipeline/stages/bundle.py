"""Bundle stage: what a Kaggle code competition's notebook needs to predict offline.

``python -m pipeline bundle -c CFG [--ensemble METHOD] [--fp16]`` writes ``bundles/<exp>/``:

* ``runs/<exp>/<id>/fold<k>/``: each fold's kept weights (``best.safetensors``, float16 with
  ``--fp16``), its resolved ``config.yaml`` and ``kept.json`` (classes, target scaling);
* ``runs/<exp>/ensemble/<method>/params.json``: what the ensemble learned (weights, selection or the
  stacking model's coefficients; JSON, nothing pickled);
* ``config.yaml``: the experiment config, reduced to the models the method blends;
* ``pipeline-<version>-py3-none-any.whl``: this package, importable straight from the wheel;
* ``predict.py``: the notebook's one command; it runs :func:`pipeline.ensembles.inference.predict_submission`, the code
  ``make predict`` runs, so the bundle's submission equals ``make predict``'s;
* ``dataset-metadata.json``: ``kaggle datasets create -p bundles/<exp>`` uploads it as a private dataset.

The folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

import pipeline
from pipeline.config.paths import Paths
from pipeline.config.schema import Config, dump_config, load_config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError
from pipeline.training import all_rows

FOLD_FILES = ("best.safetensors", "kept.json", "config.yaml")

PREDICT_SCRIPT = '''"""Predict the test images with this bundle, offline (a Kaggle code competition's notebook runs it).

    python predict.py --test-dir /kaggle/input/<competition>/test \\\\
        --sample /kaggle/input/<competition>/sample_submission.csv --out submission.csv

Imports the pipeline from the wheel next to this file (no install, no network): torch, timm,
albumentations, opencv, pandas, numpy, scipy, scikit-learn, pyyaml and safetensors must be there,
as they are in Kaggle's image.
"""
import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHOD = {method!r}  # the ensemble method (or model id) this bundle was made for


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are here; never reach for the hub
    sys.path.insert(0, str(sorted(HERE.glob("pipeline-*.whl"))[-1]))  # this bundle's own pipeline
    from pipeline.stages.bundle import predict_from_bundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-dir", required=True, help="folder of the test images")
    parser.add_argument("--sample", required=True, help="the competition's sample submission CSV")
    parser.add_argument("--out", default="submission.csv", help="where to write the submission")
    parser.add_argument("--ensemble", default=METHOD, help="ensemble method or model id (default: %(default)s)")
    args = parser.parse_args(argv)
    return predict_from_bundle(HERE, args.test_dir, args.sample, args.out, args.ensemble)


if __name__ == "__main__":
    sys.exit(main())
'''


def bundle_models(cfg: Config, method: str) -> list[str]:
    """The model ids ``method`` blends (from its saved parameters), or ``[method]`` for a model id."""
    params = Paths(cfg).ensemble_method_dir(method) / "params.json"
    if method in cfg.ensemble.methods:
        if not params.exists():
            raise PipelineError(f"{params} is missing: run `make ensemble` first (it saves what each method learned)")
        return list(artifacts.read_json(params)["models"])
    return [method]


def build_wheel(dest: Path) -> Path:
    """This package as a wheel, built by pip from the project's source (``pyproject.toml``)."""
    root = Path(pipeline.__file__).resolve().parent.parent  # the repository: pipeline/'s parent
    if not (root / "pyproject.toml").exists():
        raise PipelineError(f"`bundle` builds the pipeline's wheel from its source, and {root} has no pyproject.toml; "
                            f"run it from a clone of the repository")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(dest),
           str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("pipeline-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PipelineError(f"building the pipeline's wheel failed ({' '.join(cmd[:6])} ...): {tail[0]}")
    return wheels[-1]


def _kaggle_username() -> str | None:
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    token = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json"
    try:
        return json.loads(token.read_text()).get("username")
    except (OSError, ValueError):
        return None


def _copy_weights(src: Path, dest: Path, fp16: bool) -> None:
    if not fp16:
        shutil.copy2(src, dest)
        return
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(src)).items()}
    save_file(tensors, str(dest))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_bundle(cfg: Config, method: str | None = None, fp16: bool = False, out: str | None = None) -> Path:
    """Write the bundle folder for ``method`` (default: the ensemble with the best nested CV)."""
    from pipeline.ensembles.inference import FoldCheckpoint, best_method, wait_for_training

    paths = Paths(cfg)
    wait_for_training(cfg, "bundle")
    method = method or best_method(cfg)
    models = bundle_models(cfg, method)
    every = {**cfg.models(seed_mean=False), **cfg.seed_groups()}
    unknown = [m for m in models if m not in every]
    if unknown:
        raise PipelineError(f"'{unknown[0]}' is neither an ensemble method nor a model id of this config; valid "
                            f"models: {', '.join(every)}; methods: {', '.join(cfg.ensemble.methods)}")
    variants = [v for m in models for v in every[m]]
    for v in variants:  # every checkpoint present and trained with this config, before anything is written
        for k in range(cfg.folds.n_splits):
            FoldCheckpoint.load(cfg, v, k)
    dest = Path(out) if out else Path("bundles") / cfg.name
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    runs = tmp / "runs" / cfg.name
    for v in variants:
        for k in range(cfg.folds.n_splits):
            src, target = paths.fold_dir(v.slug, k), runs / v.slug / f"fold{k}"
            target.mkdir(parents=True)
            _copy_weights(src / "best.safetensors", target / "best.safetensors", fp16)
            for name in FOLD_FILES[1:]:
                shutil.copy2(src / name, target / name)
        if all_rows.saved_head(paths.backbone_dir(v.slug)) is not None:  # a frozen-only model's all-rows probe
            shutil.copytree(paths.backbone_dir(v.slug) / all_rows.DIR, runs / v.slug / all_rows.DIR,
                            ignore=shutil.ignore_patterns(".*"))  # not the stamps: a bundle has none
        for name in ("lr_source.json", "unfreeze.json"):  # the tuned LRs; train.unfreeze auto's decision
            if (paths.backbone_dir(v.slug) / name).exists():
                shutil.copy2(paths.backbone_dir(v.slug) / name, runs / v.slug / name)
    ensemble = cfg.ensemble
    if method in cfg.ensemble.methods:
        (runs / "ensemble" / method).mkdir(parents=True)
        for name in ("params.json", "cv.json"):
            shutil.copy2(paths.ensemble_method_dir(method) / name, runs / "ensemble" / method / name)
        ensemble = dataclasses.replace(ensemble, methods=[method])
    bundled = cfg.replace(backbones=variants, ensemble=ensemble, runs_dir="runs", folds_dir="folds",
                          submissions_dir=".", data=dataclasses.replace(cfg.data, root="."))
    (tmp / "config.yaml").write_text(dump_config(bundled))
    (tmp / "predict.py").write_text(PREDICT_SCRIPT.format(method=method))
    wheel = build_wheel(tmp)
    user = _kaggle_username()
    slug = f"{cfg.name}-bundle".lower().replace("_", "-")
    (tmp / "dataset-metadata.json").write_text(json.dumps(
        {"title": f"{cfg.name} bundle", "id": f"{user or 'INSERT_USERNAME'}/{slug}",
         "licenses": [{"name": "CC0-1.0"}]}, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    weights = sum(f.stat().st_size for f in dest.rglob("best.safetensors"))
    print(f"bundle: {method} ({len(variants)} model variants x {cfg.folds.n_splits} folds) -> {dest}: "
          f"{_size(dest) / 2**20:.1f} MiB, of which weights {weights / 2**20:.1f} MiB"
          f"{' (float16)' if fp16 else ' (float32; --fp16 halves them)'}, "
          f"wheel {(dest / wheel.name).stat().st_size / 2**10:.0f} KiB")
    if user is None:
        print(f"bundle: set your Kaggle username in {dest / 'dataset-metadata.json'} (INSERT_USERNAME), then: "
              f"kaggle datasets create -p {dest}")
    else:
        print(f"bundle: upload it as a private dataset: kaggle datasets create -p {dest}")
    return dest


def predict_from_bundle(root: Path, test_dir: str, sample: str, out: str, method: str) -> int:
    """A bundle's ``predict.py``: its config with its own runs folder, predicted as ``make predict`` does."""
    from pipeline.ensembles.inference import predict_submission

    root = Path(root).resolve()
    try:
        cfg = load_config(root / "config.yaml")
        cfg = cfg.replace(runs_dir=str(root / "runs"), data=dataclasses.replace(cfg.data, root=str(root)))
        predict_submission(cfg, test_dir=test_dir, sample=sample, method=method, out=out)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
