"""Study: how the pipeline frames and resizes images for frozen features, against timm's eval
transform, on the four development sets (issue 35, 2026-12-08).

Per set and variant: pooled features of EfficientNet-Lite0/1/2 (bundled weights, pretrained
sizes) through the pipeline's own image path (``load_image`` + albumentations), then the anchor's
probe (StandardScaler + LogisticRegression) per model, the three models' probabilities averaged:
``cv`` is the OOF accuracy of 5 folds (one fold seed; ``stratified_group`` on signs' group
column), ``test`` the hidden-test accuracy of one fit on all train rows.

- ``A``: the whole image: shorter side to the size (bicubic), centre crop (the pipeline until now);
- ``B``: timm's framing: shorter side to size / 0.875 (bicubic), centre crop;
- ``C``: B, shrinking with area interpolation;
- ``D``: A, shrinking with area interpolation (what the pipeline does now: ``augment.crop_pct: 1``);
- ``T``: timm's own eval transform (Pillow, crop_pct from each model's config).

    .venv/bin/python benchmarks/studies/framing.py ../shared/devdata signs,trashnet,scenes,steel A,B,C,D,T

Results: framing.txt beside this file.
"""
import sys
import time
from pathlib import Path
import numpy as np, pandas as pd, torch, cv2, timm
import albumentations as A
from albumentations.pytorch import ToTensorV2
from pipeline.data.images import load_image
from pipeline.engine.backbones import bundled_state_dict
from pipeline.bench.anchor import _features
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler, LabelEncoder
from sklearn.model_selection import StratifiedKFold, StratifiedGroupKFold
torch.set_num_threads(2)
MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
NAT = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}

def tf(size, variant):
    if variant == "A":
        return A.Compose([A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC), A.CenterCrop(size, size)])
    big = int(size / 0.875)
    if variant == "B":
        return A.Compose([A.SmallestMaxSize(max_size=big, interpolation=cv2.INTER_CUBIC), A.CenterCrop(size, size)])
    if variant == "D":  # whole image, area when shrinking
        return A.Compose([A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC, area_for_downscale="image"), A.CenterCrop(size, size)])
    if variant == "C":  # area when shrinking
        return A.Compose([A.SmallestMaxSize(max_size=big, interpolation=cv2.INTER_CUBIC, area_for_downscale="image"), A.CenterCrop(size, size)])

def feats(model, paths, size, variant, mean, std):
    t = tf(size, variant)
    out = []
    with torch.inference_mode():
        for s in range(0, len(paths), 32):
            imgs = [torch.from_numpy(t(image=load_image(p, size, "crop"))["image"]).permute(2, 0, 1) for p in paths[s:s+32]]
            x = (torch.stack(imgs).float() / 255 - mean) / std
            out.append(model(x).numpy())
    return np.concatenate(out)

def main(root, sets, variants):
    for name in sets:
        train, sol = pd.read_csv(root/name/"train.csv"), pd.read_csv(root/name/"solution.csv")
        trp = [str(root/name/"train"/i) for i in train.iloc[:, 0]]
        tep = [str(root/name/"test"/i) for i in sol.iloc[:, 0]]
        enc = LabelEncoder().fit(train["label"]); y = enc.transform(train["label"]); yt = enc.transform(sol[sol.columns[1]])
        if "group" in train:
            folds = list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(y, y, train["group"]))
        else:
            folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(y, y))
        for v in variants:
            t0 = time.time(); oof = np.zeros((len(y), len(enc.classes_))); full = 0; per = []
            for m in MODELS:
                model = timm.create_model(m, pretrained=False); model.load_state_dict(dict(bundled_state_dict(m)))
                model.reset_classifier(0); model.eval()
                dc = timm.data.resolve_data_config({}, model=model)
                if v == "T":
                    tr_ = timm.data.create_transform(**dc); a, b = _features(model, tr_, trp), _features(model, tr_, tep)
                else:
                    mean = torch.tensor(dc["mean"]).view(1, 3, 1, 1); std = torch.tensor(dc["std"]).view(1, 3, 1, 1)
                    a, b = feats(model, trp, NAT[m], v, mean, std), feats(model, tep, NAT[m], v, mean, std)
                for tr, va in folds:
                    sc = StandardScaler().fit(a[tr]); c = LogisticRegression(max_iter=2000).fit(sc.transform(a[tr]), y[tr])
                    oof[va] += c.predict_proba(sc.transform(a[va])) / 3
                sc = StandardScaler().fit(a); c = LogisticRegression(max_iter=2000).fit(sc.transform(a), y)
                p = c.predict_proba(sc.transform(b)); full = full + p / 3; per.append(np.mean(p.argmax(1) == yt))
            print(f"{name:9s} {v} cv {np.mean(oof.argmax(1)==y):.4f} test {np.mean(full.argmax(1)==yt):.4f} per-model {np.round(per,3)} {time.time()-t0:.0f}s", flush=True)

if __name__ == "__main__":
    torch.set_num_threads(2)
    main(Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(","))
