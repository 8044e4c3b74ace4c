"""Quality per minute on a photo set with hidden test labels (``configs/scenes.yaml``): whole train
stages of the experiment's first backbone under a few recipes, each in a fresh runs folder (no
cache shared between recipes, so each wall time includes its own feature passes), scored by the
fold mean (CV) and on the hidden test labels (``solution.csv``).

* **frozen**: the plain linear probe against the probe trained on the cached features of several
  views of each train image (``train.probe_views``: the mirror, the centre crop ``zoom``) and
  against ``zoom`` among the TTA views, all frozen-only (``train.unfreeze: never``);
* **unfreeze**: always / ``auto`` (fold 0 decides, with a paired test, whether and at which LR
  the remaining folds unfreeze); never is the frozen section's plain probe;
* **presets**: each ``preset`` (``fast``, ``balanced``, ``best``) on the experiment's other settings,
  the whole run (folds, train, ensemble, leaderboard) timed, its leaderboard pick scored on the
  hidden test.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.bench.measure import CannotRun, require_hidden_labels
from pipeline.bench.quality import solution_targets
from pipeline.config.paths import Paths
from pipeline.config.presets import PRESETS
from pipeline.config.schema import BackboneConfig, Config, config_from_dict, dump_config
from pipeline.core import artifacts
from pipeline.data.tables import read_folds, read_test_table, task_spec
from pipeline.domain.metrics import get_metric
from pipeline.engine.fit import score
from pipeline.stages.folds import run_folds

RECIPES = {
    # augment.frozen_zoom off: each recipe's views are the ones it names
    "frozen": {name: {"train.unfreeze": "never", "augment.frozen_zoom": False, **over} for name, over in {
        "probe": {"train.probe_views": ["identity"]},
        "probe + hflip views": {"train.probe_views": ["identity", "hflip"]},
        "probe + zoom views": {"train.probe_views": ["identity", "zoom"]},
        "probe, TTA + zoom": {"augment.tta": ["identity", "hflip", "zoom"]},
        "probe + zoom views, TTA + zoom": {"train.probe_views": ["identity", "zoom"],
                                           "augment.tta": ["identity", "hflip", "zoom"]}}.items()},
    "unfreeze": {"auto": {"train.unfreeze": "auto"}, "always": {"train.unfreeze": "always"}},
    "pairs": {"never": {"train.unfreeze": "never"}, "auto": {"train.unfreeze": "auto"},
              "always": {"train.unfreeze": "always"}},
    # auto with the configured unfrozen LR alone, against auto screening a short list first
    "lrs": {"configured LR": {"train.unfreeze": "auto", "train.unfreeze_lrs": []},
            "screened LRs": {"train.unfreeze": "auto", "train.unfreeze_lrs": [1e-4, 3e-4, 1e-3]}},
}
# two-class sets cut from the scene photos: the pair the frozen probe never confuses (fine-tuning
# has nothing to gain: the kind of set where `auto` should stay frozen-only) and the pair it
# confuses most (lite0 at 160 px, 5-fold OOF: 0 of 200 rows against 33 of 200)
PAIRS = {"easy": ("forest", "sea"), "hard": ("glacier", "mountain")}
SEEDS: dict = {}  # recipes measured on fewer seeds (their cost), by (section, recipe)


def _variant(cfg: Config, overrides: dict, seed: int, root: Path) -> Config:
    raw = yaml.safe_load(dump_config(cfg.replace(backbones=[cfg.backbones[0]])))
    raw.update(runs_dir=str(root / "runs"), folds_dir=str(root / "folds"), submissions_dir=str(root / "subs"))
    raw["train"]["seed"] = seed
    raw["train"]["use_tuned"] = "false"
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(raw)


def hidden_test_score(cfg: Config, model: str) -> float:
    """The model's fold-averaged ``test.csv`` scored against ``solution.csv`` beside the sample."""
    table = read_folds(cfg)
    spec, test = task_spec(cfg, table), read_test_table(cfg)
    frame = pd.read_csv(Paths(cfg).test_csv(model), dtype={cfg.data.id_column: str}, keep_default_na=False)
    metric = get_metric(cfg.metric, spec.task)
    return float(score(metric, spec, solution_targets(cfg, spec, test), spec.predictions_from_frame(frame)))


def _train_and_score(vcfg: Config) -> tuple[dict, dict]:
    """Folds and the train stage of ``vcfg``'s one backbone: its cv.json, and its CV, hidden-test
    score and the train stage's wall time."""
    from pipeline.stages.train import run_train

    run_folds(vcfg)
    start = time.perf_counter()
    run_train(vcfg)
    seconds = time.perf_counter() - start
    model = vcfg.backbones[0].slug
    cv = artifacts.read_json(Paths(vcfg).cv_json(model))
    return cv, {"cv": cv["cv_mean"], "test": hidden_test_score(vcfg, model), "seconds": seconds}


def recipe_runs(cfg: Config, section: str, seeds: tuple[int, ...] = (42, 43, 44), data: dict | None = None,
                tag: str = "") -> pd.DataFrame:
    """Per recipe and seed: CV, hidden test, the train stage's wall time and ``auto``'s decision.
    ``data``: ``data.*`` overrides (another data set); ``tag`` names its runs folders."""
    require_hidden_labels(cfg)
    rows = []
    for name, overrides in RECIPES[section].items():
        for seed in SEEDS.get((section, name), seeds):
            folder = f"{section}{tag}-{name.replace(' ', '_').replace('+', '')}-s{seed}"
            cv, scores = _train_and_score(_variant(cfg, {**(data or {}), **overrides}, seed,
                                                   Path(cfg.runs_dir) / "bench" / folder))
            rows.append({"recipe": name, "seed": seed, **scores,
                         "decision": (cv.get("unfreeze") or {}).get("summary", "")})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def recipe_table(cfg: Config, frame: pd.DataFrame) -> str:
    """Markdown: ``recipe_runs``' rows, then the means per recipe."""
    lines = ["| recipe | seed | CV | hidden test | test - CV | train stage s | decision |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.recipe} | {r.seed} | {r.cv:.4f} | {r.test:.4f} | {r.test - r.cv:+.4f} | {r.seconds:.0f} | "
              f"{r.decision} |" for r in frame.itertuples()]
    means = frame.groupby("recipe", sort=False)[["cv", "test", "seconds"]].mean()
    lines += ["", "| recipe | mean CV | mean hidden test | mean train stage s |", "|---|---|---|---|"]
    lines += [f"| {name} | {m.cv:.4f} | {m.test:.4f} | {m.seconds:.0f} |" for name, m in means.iterrows()]
    b = cfg.backbones[0]
    lines += ["", f"{b.name} ({b.weights}) at {b.image_size} px, {cfg.folds.n_splits} folds, TTA "
              f"{', '.join(cfg.augment.tta)}; seeds {', '.join(map(str, sorted(frame.seed.unique())))} (train.seed); "
              f"every run in its own runs folder."]
    return "\n".join(lines)


def run_recipes(cfg: Config, section: str, seeds: tuple[int, ...] = (42, 43, 44)) -> str:
    """Markdown: per recipe and seed, CV, hidden test and the train stage's wall time; then the
    means per recipe."""
    return recipe_table(cfg, recipe_runs(cfg, section, seeds))


ZOOM_MEMBERS = ("efficientnet_lite1", "efficientnet_lite2")  # other bundled backbones, frozen-only


def tta_zoom(cfg: Config, seed: int = 42, members: tuple[str, ...] | None = None) -> str:
    """Markdown: the config's TTA views against the same plus ``zoom``, side by side: the first
    backbone frozen-only and fine-tuned (``always``), and ``members`` (timm names, default
    ``ZOOM_MEMBERS``; bundled, at the first backbone's size) frozen-only; CV, hidden test, the train
    stage's wall time."""
    require_hidden_labels(cfg)
    members = ZOOM_MEMBERS if members is None else members
    base = list(cfg.augment.tta)
    if "zoom" in base:
        base.remove("zoom")
    first = cfg.backbones[0]
    models = [(first, "never"), (first, "always")] + [
        (BackboneConfig(name=name, weights="bundled", image_size=first.image_size), "never") for name in members]
    rows = []
    for bcfg, unfreeze in models:
        for views in (base, base + ["zoom"]):
            folder = f"tta-{bcfg.name}-{unfreeze}-{'-'.join(views)}"
            overrides = {"train.unfreeze": unfreeze, "augment.tta": views, "augment.frozen_zoom": False}
            vcfg = _variant(cfg.replace(backbones=[bcfg]), overrides, seed, Path(cfg.runs_dir) / "bench" / folder)
            _, scores = _train_and_score(vcfg)
            rows.append({"model": f"{bcfg.name} {'frozen-only' if unfreeze == 'never' else 'fine-tuned (always)'}",
                         "tta": ", ".join(views), **scores})
            print(rows[-1], flush=True)
    lines = ["| model | TTA views | CV | hidden test | train stage s |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['tta']} | {r['cv']:.4f} | {r['test']:.4f} | {r['seconds']:.0f} |" for r in rows]
    pairs = list(zip(rows[::2], rows[1::2]))
    cv_up = sum(z["cv"] > b["cv"] for b, z in pairs)
    test_up = sum(z["test"] > b["test"] for b, z in pairs)
    test_down = sum(z["test"] < b["test"] for b, z in pairs)
    lines += ["", f"With `zoom` added: CV higher for {cv_up} of {len(pairs)} models, hidden test higher for {test_up} "
              f"and lower for {test_down}; mean hidden test {np.mean([z['test'] - b['test'] for b, z in pairs]):+.4f}, "
              f"mean train stage {np.mean([z['seconds'] / b['seconds'] for b, z in pairs]):.2f}x. "
              f"{first.weights} weights at {first.image_size} px, {cfg.folds.n_splits} folds, seed {seed} "
              f"(train.seed); every run in its own runs folder."]
    return "\n".join(lines)


def _require_train_csv(cfg: Config, what: str) -> None:
    if cfg.data.train_csv is None:
        raise CannotRun(f"it {what} in a train CSV, and {Paths(cfg).train_dir} is read from class sub-folders "
                        f"(data.train_csv: null)")


def _require_classes(cfg: Config, pairs: dict[str, tuple[str, str]]) -> None:
    """CannotRun unless the data has hidden labels, a train CSV and every class of ``pairs``."""
    from pipeline.core.errors import first_few
    from pipeline.data.tables import read_train_table

    require_hidden_labels(cfg)
    _require_train_csv(cfg, "cuts two-class sets")
    found = set(read_train_table(cfg, check_readable=False)[cfg.data.target_columns[0]])
    missing = sorted({c for pair in pairs.values() for c in pair} - found)
    if missing:
        raise CannotRun(f"its pairs ({', '.join(' and '.join(p) for p in pairs.values())}) are cut from the scene "
                        f"photos (CONFIG=configs/scenes.yaml), and {Paths(cfg).train_csv} has no class "
                        f"{first_few(missing)}")


def _class_subset(cfg: Config, classes: tuple[str, ...], folder: Path) -> dict:
    """The rows of ``classes`` only, train and hidden test: their train.csv, sample_submission.csv
    and solution.csv in ``folder`` (the images stay where they are). Returns the ``data.*``
    overrides that read them."""
    from pipeline.data.tables import read_csv

    paths, d = Paths(cfg), cfg.data
    target = d.target_columns[0]
    train = read_csv(paths.train_csv, "train table")
    solution = read_csv(paths.sample_submission.parent / "solution.csv", "solution file")
    sample = read_csv(paths.sample_submission, "sample submission")
    solution = solution[solution[target].isin(classes)]
    artifacts.write_csv(folder / "train.csv", train[train[target].isin(classes)])
    artifacts.write_csv(folder / "solution.csv", solution)
    artifacts.write_csv(folder / "sample_submission.csv", sample[sample[d.id_column].isin(solution[d.id_column])])
    return _data_in(paths, folder, "sample_submission.csv")


def unfreeze_pairs(cfg: Config, seeds: tuple[int, ...] = (42, 43, 44),
                   pairs: dict[str, tuple[str, str]] | None = None) -> str:
    """Markdown: never, auto and always on two-class sets cut from the photos (``pairs``: tag ->
    two classes, default ``PAIRS``), per seed, then what ``auto`` saved against ``always`` and what
    it scored against it."""
    pairs = PAIRS if pairs is None else pairs
    _require_classes(cfg, pairs)
    parts = []
    for tag, classes in pairs.items():
        data = _class_subset(cfg, classes, Path(cfg.runs_dir) / "bench" / f"pairs-{tag}-data")
        frame = recipe_runs(cfg, "pairs", seeds, data, f"-{tag}")
        means = frame.groupby("recipe")[["test", "seconds"]].mean()
        n_train = len(pd.read_csv(Path(data["data.root"]) / "train.csv"))
        unfroze = sum("unfreeze at" in d for d in frame[frame.recipe == "auto"].decision)
        parts.append(f"**The {tag} pair: {classes[0]} against {classes[1]}** ({n_train} train rows, "
                     f"{len(pd.read_csv(Path(data['data.root']) / 'solution.csv'))} hidden test rows)\n\n"
                     f"{recipe_table(cfg, frame)}\n\n"
                     f"`auto` unfroze in {unfroze} of {len(seeds)} seeds; against `always`: mean train stage "
                     f"{means.seconds['auto']:.0f} s against {means.seconds['always']:.0f} s "
                     f"({means.seconds['auto'] / means.seconds['always']:.2f}x), mean hidden test "
                     f"{means.test['auto'] - means.test['always']:+.4f}.")
    return "\n\n".join(parts)


def cpu_layout(cfg: Config) -> str:
    """Markdown: the first backbone's train stage on this machine with ``train.channels_last`` and
    inference passes sized to a CPU (now) against contiguous tensors in one pass per loader batch
    (before), each in a fresh runs folder, before and now alternating: the frozen-only path of
    every fold (scored: CV and hidden test), and fold 0 with its probe and one unfrozen epoch."""
    from unittest import mock

    from pipeline.engine import fit
    from pipeline.stages.train import run_train

    require_hidden_labels(cfg)
    layouts = {"before": (False, 1 << 62), "now": (True, fit.CPU_PASS_PIXELS)}
    modes = {"frozen-only, every fold": ({"train.unfreeze": "never"}, None),
             "fold 0: probe + 1 unfrozen epoch": ({"train.unfreeze": "always", "train.unfrozen.epochs": 1}, 0)}
    rows, seconds = [], {}
    for mode, (overrides, fold) in modes.items():
        for layout, (channels_last, pixels) in layouts.items():
            root = Path(cfg.runs_dir) / "bench" / f"cpu-{layout}-{'fold0' if fold == 0 else 'frozen'}"
            vcfg = _variant(cfg, {**overrides, "train.channels_last": channels_last}, 42, root)
            run_folds(vcfg)
            with mock.patch.object(fit, "CPU_PASS_PIXELS", pixels):
                start = time.perf_counter()
                run_train(vcfg, fold=fold)
                seconds[mode, layout] = time.perf_counter() - start
            model = vcfg.backbones[0].slug
            scores = ""
            if fold is None:
                cv = artifacts.read_json(Paths(vcfg).cv_json(model))["cv_mean"]
                scores = f"CV {cv:.4f}, hidden test {hidden_test_score(vcfg, model):.4f}"
            rows.append(f"| {mode} | {layout} | {seconds[mode, layout]:.0f} | {scores} |")
            print(rows[-1], flush=True)
    lines = ["| train stage | layout | s | scores |", "|---|---|---|---|", *rows, "",
             "| train stage | speed-up now / before |", "|---|---|"]
    lines += [f"| {mode} | {seconds[mode, 'before'] / seconds[mode, 'now']:.2f}x |" for mode in modes]
    b = cfg.backbones[0]
    lines += ["", f"{b.name} ({b.weights}) at {b.image_size} px, batch {cfg.train.batch_size}, {cfg.folds.n_splits} "
              f"folds, TTA {', '.join(cfg.augment.tta)}. before: `train.channels_last: false` and one forward pass "
              f"per loader batch (what a CPU ran until 2026-12-03); now: the defaults (channels_last, passes of "
              f"about {fit.CPU_PASS_PIXELS // 1000}k pixels: 16 images at 160-192 px). Wall times include each "
              f"run's own feature passes and model creation."]
    return "\n".join(lines)


def feature_ensemble(cfg: Config, members: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1",
                                                             "efficientnet_lite2"), seeds: tuple[int, ...] = (42,),
                     probe_views: tuple[str, ...] = ("identity",)) -> str:
    """Markdown: one probe over the concatenated frozen features of several backbones, against the
    mean of their separate probes (and each probe alone), per seed: CV and hidden test."""
    import torch

    from pipeline.engine.fit import activate_mean, make_loss
    from pipeline.engine.probe import fit_linear_probe
    from pipeline.stages.train import run_train
    from pipeline.training.trainer import FoldJob, FoldTrainer

    require_hidden_labels(cfg)
    rows = []
    for seed in seeds:
        root = Path(cfg.runs_dir) / "bench" / f"features-s{seed}"
        base = _variant(cfg, {"train.unfreeze": "never", "train.probe_views": list(probe_views)}, seed, root)
        members_cfg = [base.replace(backbones=[dataclasses.replace(base.backbones[0], name=m, id=m)]) for m in members]
        table, spec, test = None, None, None
        feats, preds = {}, {}
        for mcfg in members_cfg:
            run_folds(mcfg)
            run_train(mcfg)
            table = read_folds(mcfg)
            spec, test = task_spec(mcfg, table), read_test_table(mcfg)
            bcfg = mcfg.backbones[0]
            trainer = FoldTrainer(FoldJob(mcfg, bcfg, spec, table, 0, test=test, progress=False,
                                          feature_cache_dir=Paths(mcfg).feature_cache_dir(bcfg.slug)))
            views = list(mcfg.augment.tta)
            feats[bcfg.slug] = {(v, t): trainer.frozen_features(v, t).cpu() for v in views for t in (False, True)}
            preds[bcfg.slug] = (pd.read_csv(Paths(mcfg).oof_csv(bcfg.slug), dtype={cfg.data.id_column: str}),
                                pd.read_csv(Paths(mcfg).test_csv(bcfg.slug), dtype={cfg.data.id_column: str}))
        metric, y = get_metric(cfg.metric, spec.task), spec.encode(table)
        y_test = solution_targets(base, spec, test)
        folds = table["fold"].to_numpy()

        def scores(oof: np.ndarray, test_preds: np.ndarray) -> tuple[float, float]:
            cv = np.mean([score(metric, spec, y[folds == k], oof[folds == k]) for k in range(cfg.folds.n_splits)])
            return float(cv), float(score(metric, spec, y_test, test_preds))

        for m in members:
            oof, tst = preds[m]
            rows.append({"model": f"probe {m}", "seed": seed, **dict(zip(("cv", "test"), scores(
                spec.predictions_from_frame(oof), spec.predictions_from_frame(tst))))})
        mean_oof = np.mean([spec.predictions_from_frame(preds[m][0]) for m in members], axis=0)
        mean_test = np.mean([spec.predictions_from_frame(preds[m][1]) for m in members], axis=0)
        rows.append({"model": "mean of the probes", "seed": seed,
                     **dict(zip(("cv", "test"), scores(mean_oof, mean_test)))})
        views = list(base.augment.tta)
        concat = {key: torch.cat([feats[m][key] for m in members], dim=1) for key in feats[members[0]]}
        loss_fn = make_loss(spec, base.train)
        oof, test_sum = np.zeros((len(table), spec.num_outputs)), []
        y_t = torch.as_tensor(np.array(y))  # a copy: the encoded labels may be read-only
        for k in range(cfg.folds.n_splits):
            tr, va = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
            weight, bias, _ = fit_linear_probe(spec, loss_fn, [concat[v, False][tr] for v in probe_views], y_t[tr],
                                               seed=seed + k)
            oof[va] = activate_mean(spec, [concat[v, False][va] @ weight.T + bias for v in views])
            test_sum.append(activate_mean(spec, [concat[v, True] @ weight.T + bias for v in views]))
        rows.append({"model": "one probe on the concatenated features", "seed": seed,
                     **dict(zip(("cv", "test"), scores(oof, np.mean(test_sum, axis=0))))})
        print(rows[-2:], flush=True)
    frame = pd.DataFrame(rows)
    lines = ["| model | seed | CV | hidden test |", "|---|---|---|---|"]
    lines += [f"| {r.model} | {r.seed} | {r.cv:.4f} | {r.test:.4f} |" for r in frame.itertuples()]
    means = frame.groupby("model", sort=False)[["cv", "test"]].mean()
    lines += ["", "| model | mean CV | mean hidden test |", "|---|---|---|"]
    lines += [f"| {name} | {m.cv:.4f} | {m.test:.4f} |" for name, m in means.iterrows()]
    first = cfg.backbones[0]
    lines += ["", f"{', '.join(members)} ({first.weights}) at {first.image_size} px, frozen-only, "
              f"{cfg.folds.n_splits} folds, probe views {', '.join(probe_views)}, TTA {', '.join(cfg.augment.tta)}; "
              f"seeds {', '.join(map(str, seeds))} (train.seed)."]
    return "\n".join(lines)


def _flipped_copy(cfg: Config, folder: Path, share: float, seed: int) -> tuple[dict, list[str]]:
    """A copy of the train table in ``folder`` with ``share`` of its labels flipped to another class
    (seeded); the images, sample and solution stay where they are. Returns the ``data.*`` overrides
    that read it and the flipped ids."""
    from pipeline.data.tables import read_csv

    paths, d = Paths(cfg), cfg.data
    table = read_csv(paths.train_csv, "train table")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(table), round(share * len(table)), replace=False)
    classes = sorted(table[d.target_columns[0]].unique())
    for row in rows:
        given = table.iloc[row][d.target_columns[0]]
        table.iloc[row, table.columns.get_loc(d.target_columns[0])] = rng.choice([c for c in classes if c != given])
    artifacts.write_csv(folder / "train.csv", table)
    return _data_in(paths, folder, str(paths.sample_submission.resolve())), table[d.id_column].iloc[rows].tolist()


def _data_in(paths: Paths, folder: Path, sample: str) -> dict:
    """``data.*`` overrides reading ``folder``'s train.csv, the original image folders and ``sample``."""
    return {"data.root": str(folder), "data.train_csv": "train.csv", "data.train_dir": str(paths.train_dir.resolve()),
            "data.test_dir": str(paths.test_dir.resolve()), "data.sample_submission": sample}


def label_noise(cfg: Config, share: float = 0.05, flip_seed: int = 0, seed: int = 42) -> str:
    """Markdown: ``share`` of the train labels flipped (seeded), ``label-issues`` on a frozen-only model's
    OOF probabilities, the precision and recall of its suspects against the flips, and the hidden-test
    accuracy of models trained on the clean labels, on the flipped ones, without cleanlab's issues
    (``data.exclude_ids``: a copy of ``label_issues.csv``) and without the flipped rows themselves."""
    import shutil

    from pipeline.stages.label_issues import run_label_issues

    require_hidden_labels(cfg)
    _require_train_csv(cfg, "flips labels")
    base = Path(cfg.runs_dir) / "bench" / f"labels-flip{flip_seed}"
    frozen = {"train.unfreeze": "never"}
    data, planted = _flipped_copy(cfg, base / "data", share, flip_seed)

    def trained(name: str, folder: str, overrides: dict) -> tuple[Config, dict]:
        vcfg = _variant(cfg, {**frozen, **overrides}, seed, base / folder)
        row = {"train on": name, **_train_and_score(vcfg)[1], "rows": len(read_folds(vcfg))}
        print(row, flush=True)
        return vcfg, row

    rows = [trained("clean labels", "clean", {})[1]]
    flipped = f"{share:.0%} flipped"
    noisy, row = trained(flipped, "flipped", data)
    rows.append(row)
    start = time.perf_counter()
    issues_csv = run_label_issues(noisy, force=True)
    finder_s = time.perf_counter() - start
    issues = pd.read_csv(issues_csv, dtype={cfg.data.id_column: str})
    ids, flagged = issues[cfg.data.id_column], issues["issue"].astype(bool)
    k, planted_set = len(planted), set(planted)
    hits_k = int(ids.head(k).isin(planted_set).sum())
    hits_issues = int(ids[flagged].isin(planted_set).sum())
    exclude = base / "exclude_ids.csv"  # what a user does: a copy of label_issues.csv (its issue rows are dropped)
    shutil.copyfile(issues_csv, exclude)
    oracle = base / "planted_ids.csv"
    artifacts.write_csv(oracle, pd.DataFrame({cfg.data.id_column: planted}))
    for name, folder, path in ((f"{flipped}, cleanlab's issues excluded", "excluded", exclude),
                               (f"{flipped}, the flipped rows excluded (oracle)", "oracle", oracle)):
        rows.append(trained(name, folder, {**data, "data.exclude_ids": str(path.resolve())})[1])
    b, n_test, n_issues = cfg.backbones[0], len(read_test_table(cfg, check_readable=False)), int(flagged.sum())
    intro = (f"{len(planted)} of {len(issues)} train labels ({share:.0%}) flipped to another class (numpy seed "
             f"{flip_seed}); `label-issues` on the frozen-only model's OOF probabilities ({finder_s:.1f} s):")
    issue_row = (f"| cleanlab's issue set (`issue` True) | {n_issues} | {hits_issues} | "
                 f"{hits_issues / max(n_issues, 1):.2f} | {hits_issues / k:.2f} |")
    lines = [intro, "", "| suspects | rows | flipped among them | precision | recall |", "|---|---|---|---|---|",
             f"| top-k, k = flipped rows | {k} | {hits_k} | {hits_k / k:.2f} | {hits_k / k:.2f} |", issue_row, "",
             "| trained on | train rows | CV (its own labels) | hidden test accuracy | train stage s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['train on']} | {r['rows']} | {r['cv']:.4f} | {r['test']:.4f} | {r['seconds']:.0f} |"
              for r in rows]
    setting = (f"{b.name} ({b.weights}) at {b.image_size} px, frozen-only (train.unfreeze: never), "
               f"{cfg.folds.n_splits} folds, TTA {', '.join(cfg.augment.tta)}, train.seed {seed}; every run in its "
               f"own runs folder; the hidden test has {n_test} images, so one image is {1 / n_test:.2%} of its "
               f"accuracy.")
    lines += ["", setting]
    return "\n".join(lines)


def _preset_variant(cfg: Config, preset: str, seed: int, root: Path, keep: tuple[str, ...] = ()) -> Config:
    """The experiment's resolved settings with ``preset``, less every key the preset sets but those
    in ``keep`` (so the preset's value applies, not the experiment's), in its own runs folder."""
    raw = yaml.safe_load(dump_config(cfg))
    for dotted in (key for key in PRESETS[preset] if key not in keep):
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) or {}
        node.pop(leaf, None)
    raw.update(name=f"{cfg.name}-{preset}", preset=preset, runs_dir=str(root / "runs"), folds_dir=str(root / "folds"),
               submissions_dir=str(root / "subs"))
    raw["train"]["seed"] = seed
    raw["train"]["use_tuned"] = "false"
    return config_from_dict(raw)


def bench_presets(cfg: Config, presets: tuple[str, ...] = tuple(PRESETS), seed: int = 42,
                  keep: tuple[str, ...] = ()) -> str:
    """Markdown: per preset, the whole run (folds -> train -> ensemble -> leaderboard) in a fresh
    runs folder: its models, the leaderboard's pick (the best honest score: nested CV for a blend,
    the fold mean for a model) with that score, the pick's submission scored on the hidden test
    labels (``solution.csv``) and the wall time, stage by stage. ``keep``: keys a preset sets
    (``"backbones"``) that keep the experiment's value instead (a smaller run)."""
    from pipeline.ensembles.scores import collect
    from pipeline.stages.ensemble import run_ensemble
    from pipeline.stages.leaderboard import run_leaderboard
    from pipeline.stages.submit import run_score
    from pipeline.stages.train import run_train

    require_hidden_labels(cfg)
    rows = []
    for preset in presets:
        vcfg = _preset_variant(cfg, preset, seed, Path(cfg.runs_dir) / "bench" / f"presets-{preset}-s{seed}", keep)
        seconds = {}
        for stage, run in (("folds", run_folds), ("train", run_train), ("ensemble", run_ensemble),
                           ("leaderboard", run_leaderboard)):
            start = time.perf_counter()
            run(vcfg)
            seconds[stage] = time.perf_counter() - start
        board = collect(vcfg)[0]
        pick = board.iloc[0]
        solution = Paths(vcfg).sample_submission.parent / "solution.csv"
        unfroze = [m for m in vcfg.models() if (artifacts.read_json(Paths(vcfg).cv_json(m)).get("unfreeze") or {})
                   .get("unfreeze", vcfg.train.unfreeze == "always")]
        rows.append({"preset": preset, "models": ", ".join(f"{b.slug} {b.image_size} px" for b in vcfg.backbones),
                     "unfroze": ", ".join(unfroze) or "none", "pick": f"{pick['model']} ({pick['kind']})",
                     "cv": float(pick["score"]), "test": run_score(vcfg, pick["submission"], solution),
                     "seconds": seconds})
        print(rows[-1], flush=True)
    lines = ["| preset | models | fine-tuned | leaderboard pick | its CV | hidden test | test - CV | wall min "
             "(folds + train + ensemble + leaderboard) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['preset']} | {r['models']} | {r['unfroze']} | {r['pick']} | {r['cv']:.4f} | "
                     f"{r['test']:.4f} | {r['test'] - r['cv']:+.4f} | {sum(s.values()) / 60:.1f} "
                     f"({' + '.join(f'{v / 60:.1f}' for v in s.values())}) |")
    lines += ["", f"Every preset on {cfg.name}'s other settings ({cfg.folds.n_splits} folds, batch "
              f"{cfg.train.batch_size}, train.seed {seed}, no tuned LRs), each run in its own runs folder (no cache "
              f"shared). The pick is the leaderboard's first row (its honest score: nested CV for a blend, the fold "
              f"mean for a model); hidden test: the pick's submission file scored against solution.csv."]
    return "\n".join(lines)

