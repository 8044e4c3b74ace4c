"""Study: how the linear probe's choices and the fold CV compare with the hidden test, on cached
features of the four development sets (issue 35, 2026-12-07).

Step 1 (about 15 min on 2 CPU cores) writes, per set, the pooled features of EfficientNet-Lite0/1/2
at their pretrained sizes through timm's eval transform (the probe anchor's; the image and its
mirror) to ``OUT/<set>.npz``. Step 2 (about 3 min) fits, per model and fold of 5 (3 fold seeds;
``stratified_group`` on the ``group`` column where there is one):

- ``sk``: the anchor's StandardScaler + LogisticRegression(C=1);
- ``ours``: the pipeline's probe (:func:`pipeline.engine.probe.fit_linear_probe`, L2 by held-out
  loss on an inner split of the fold's train rows);
- ``ours_std``: the same on standardised features;
- ``ours_hflip``: the same trained on both views, predicting their mean;

and prints the mean of the three models' OOF accuracy (the CV), the test accuracy of the mean of
the 15 fold models, and (seed 0) the test accuracy of the same fit on every train row.

    .venv/bin/python benchmarks/studies/probe_variants.py features ../shared/devdata /tmp/probe-study scenes trashnet steel signs
    .venv/bin/python benchmarks/studies/probe_variants.py fit /tmp/probe-study scenes trashnet steel signs

Results: probe_variants.txt beside this file.
"""
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def features(root: Path, out: Path, sets: list[str]) -> None:
    import timm
    import torchvision.transforms.functional as F

    from pipeline.bench.anchor import _features
    from pipeline.engine.backbones import bundled_state_dict

    out.mkdir(parents=True, exist_ok=True)
    for name in sets:
        train, test = pd.read_csv(root / name / "train.csv"), pd.read_csv(root / name / "solution.csv")
        train_paths = [str(root / name / "train" / i) for i in train.iloc[:, 0]]
        test_paths = [str(root / name / "test" / i) for i in test.iloc[:, 0]]
        saved = {"y": train["label"].to_numpy(), "yt": test[test.columns[1]].to_numpy()}
        if "group" in train:
            saved["g"] = train["group"].to_numpy()
        for model_name in MODELS:
            start = time.time()
            model = timm.create_model(model_name, pretrained=False)
            model.load_state_dict(dict(bundled_state_dict(model_name)))
            model.reset_classifier(0)
            model.eval()
            transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
            mirrored = lambda image, t=transform: t(F.hflip(image))  # noqa: E731
            saved[model_name + "_tr"], saved[model_name + "_te"] = (_features(model, transform, p)
                                                                    for p in (train_paths, test_paths))
            saved[model_name + "_trh"], saved[model_name + "_teh"] = (_features(model, mirrored, p)
                                                                      for p in (train_paths, test_paths))
            print(name, model_name, f"{time.time() - start:.1f} s", flush=True)
        np.savez(out / f"{name}.npz", **saved)


def fit(out: Path, sets: list[str]) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.preprocessing import LabelEncoder, StandardScaler

    from pipeline.engine.probe import fit_linear_probe

    loss = torch.nn.functional.cross_entropy
    tensor = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731

    def sk(d, m, rows, k, y, evals):
        x = d[m + "_tr"][rows]
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x), y[rows])
        return [clf.predict_proba(scaler.transform(e[0])) for e in evals]

    def ours(d, m, rows, k, y, evals, hflip=False, std=False):
        x = d[m + "_tr"][rows]
        views = [x] + ([d[m + "_trh"][rows]] if hflip else [])
        mu, sd = (x.mean(0), x.std(0) + 1e-6) if std else (0, 1)
        spec = type("Spec", (), {"num_outputs": k})()
        w, b, _ = fit_linear_probe(spec, loss, [tensor((v - mu) / sd) for v in views], torch.tensor(y[rows]))
        prob = lambda e: torch.softmax(tensor((e - mu) / sd) @ w.T + b, 1).numpy()  # noqa: E731
        return [np.mean([prob(e) for e in (pair if hflip else pair[:1])], 0) for pair in evals]

    methods = {"sk": sk, "ours": ours, "ours_std": lambda *a: ours(*a, std=True),
               "ours_hflip": lambda *a: ours(*a, hflip=True)}
    for name in sets:
        d = np.load(out / f"{name}.npz", allow_pickle=True)
        enc = LabelEncoder().fit(d["y"])
        y, yt, k = enc.transform(d["y"]), enc.transform(d["yt"]), len(enc.classes_)
        results = {}
        for seed in (0, 1, 2):
            if "g" in d:
                folds = list(StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(y, y, d["g"]))
            else:
                folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(y, y))
            for method, run in methods.items():
                oof, test, full = np.zeros((len(y), k)), 0, 0
                for m in MODELS:
                    for tr, va in folds:
                        pv, pt = run(d, m, tr, k, y, [(d[m + "_tr"][va], d[m + "_trh"][va]),
                                                      (d[m + "_te"], d[m + "_teh"])])
                        oof[va] += pv / len(MODELS)
                        test = test + pt / (len(MODELS) * len(folds))
                    if seed == 0:
                        full = full + run(d, m, np.arange(len(y)), k, y, [(d[m + "_te"], d[m + "_teh"])])[0] / len(MODELS)
                row = [np.mean(oof.argmax(1) == y), np.mean(test.argmax(1) == yt)]
                if seed == 0:
                    row.append(np.mean(full.argmax(1) == yt))
                results.setdefault(method, []).append(row)
        for method, rows in results.items():
            cv, te = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
            print(f"{name:9s} {method:10s} cv {cv.mean():.4f} (seeds {np.round(cv, 3)}) fold-models test "
                  f"{te.mean():.4f} (seeds {np.round(te, 3)}) all-rows fit test {rows[0][2]:.4f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1] == "features":
        features(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    else:
        fit(Path(sys.argv[2]), sys.argv[3:])
