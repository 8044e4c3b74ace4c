"""The data report ``init`` writes: ``runs/<exp>/data_report.md`` and ``data_report.png``.

From a :class:`~pipeline.data.inspect.Competition` and one :func:`~pipeline.data.scan.scan_images`
pass over every image file: row and image counts, class balance, image sizes, modes and formats,
unreadable files, rows without images and images without rows, exact duplicates (same bytes) inside
train with conflicting labels and between train and test (a leak), and near-duplicates by
perceptual hash. The PNG shows a few images per class (per label, or per target bin).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import artifacts
from pipeline.data.images import PATH
from pipeline.data.inspect import Competition
from pipeline.data.scan import NEAR_DISTANCE, near_groups, scan_images

REPORT_MD = "data_report.md"
REPORT_PNG = "data_report.png"
SHOWN = 15  # rows of a listing in the report
PER_CLASS = 6  # images per class in the PNG
MAX_ROWS_PNG = 12  # classes (labels, bins) in the PNG


@dataclass
class Findings:
    """What the report found; ``images`` has one row per scanned file (``split``, ``id``, ``label``)."""

    images: pd.DataFrame
    exact_train_groups: list[pd.DataFrame] = field(default_factory=list)
    exact_conflicts: list[pd.DataFrame] = field(default_factory=list)
    train_test_exact: pd.DataFrame = field(default_factory=pd.DataFrame)  # test id, train ids, train labels
    near_train_groups: list[pd.DataFrame] = field(default_factory=list)
    near_conflicts: list[pd.DataFrame] = field(default_factory=list)
    train_test_near: pd.DataFrame = field(default_factory=pd.DataFrame)
    rows_without_images: dict[str, list[str]] = field(default_factory=dict)  # split -> ids
    images_without_rows: dict[str, list[str]] = field(default_factory=dict)  # split -> file names

    @property
    def unreadable(self) -> pd.DataFrame:
        return self.images[self.images["problem"].notna()]

    def summary(self) -> list[str]:
        """One line per finding a user should act on (empty when the data looks clean)."""
        lines = []
        for split, ids in self.rows_without_images.items():
            if ids:
                lines.append(f"{len(ids)} {split} rows have no image (e.g. {ids[0]!r}): `make folds` refuses them")
        if len(self.unreadable):
            lines.append(f"{len(self.unreadable)} image files cannot be read (e.g. {self.unreadable['path'].iloc[0]})")
        if self.exact_conflicts:
            lines.append(f"{len(self.exact_conflicts)} groups of identical train images carry different labels")
        if len(self.train_test_exact):
            lines.append(f"{len(self.train_test_exact)} test images are byte-identical to train images (a leak)")
        if self.near_conflicts:
            lines.append(f"{len(self.near_conflicts)} groups of near-duplicate train images carry different labels")
        if len(self.train_test_near):
            lines.append(f"{len(self.train_test_near)} test images are near-duplicates of train images")
        return lines


# ---------------------------------------------------------------------------- findings


def _image_table(comp: Competition, scan: pd.DataFrame) -> pd.DataFrame:
    """Every scanned file with its split (test when a test row or only the test folder names it)
    and, where a row names it, its id and label text."""
    train_rows = comp.train[comp.train[PATH].notna()].drop_duplicates(PATH)
    test_rows = comp.test[comp.test[PATH].notna()].drop_duplicates(PATH)
    train_ids = pd.Series(train_rows[comp.id_column].to_numpy(), index=train_rows[PATH].to_numpy())
    labels = pd.Series(comp.label_keys()[train_rows.index].to_numpy(), index=train_rows[PATH].to_numpy())
    test_ids = pd.Series(test_rows[comp.id_column].to_numpy(), index=test_rows[PATH].to_numpy())
    only_test = set(comp.test_files) - set(comp.train_files)
    is_test = scan["path"].isin(set(test_ids.index)) | (scan["path"].isin(only_test)
                                                         & ~scan["path"].isin(set(train_ids.index)))
    images = scan.assign(split=np.where(is_test, "test", "train"))
    images["id"] = np.where(is_test, scan["path"].map(test_ids), scan["path"].map(train_ids))
    images["label"] = scan["path"].map(labels).where(~is_test)
    return images


def _groups(frame: pd.DataFrame, key: str) -> list[pd.DataFrame]:
    """Groups of two or more rows sharing ``key``, largest first."""
    repeated = frame[frame[key].duplicated(keep=False)]
    return sorted((g for _, g in repeated.groupby(key, sort=False)), key=len, reverse=True)


def _conflicting(groups: list[pd.DataFrame]) -> list[pd.DataFrame]:
    return [g for g in groups if g["label"].dropna().nunique() > 1]


def _across(images: pd.DataFrame, key: str, exclude: set[str] = frozenset()) -> pd.DataFrame:
    """Test images sharing ``key`` with train images: test id, the train ids and their labels."""
    train = images[(images["split"] == "train") & images[key].notna()]
    test = images[(images["split"] == "test") & images[key].notna() & ~images["path"].isin(exclude)]
    by_key = train.groupby(key)
    rows = []
    for _, t in test[test[key].isin(set(train[key]))].iterrows():
        match = by_key.get_group(t[key])
        rows.append({"test_id": t["id"] if pd.notna(t["id"]) else Path(t["path"]).name, "test_path": t["path"],
                     "train_ids": list(match["id"].fillna("(no row)")),
                     "train_labels": sorted(set(match["label"].dropna()))})
    return pd.DataFrame(rows, columns=["test_id", "test_path", "train_ids", "train_labels"])


def find(comp: Competition, scan: pd.DataFrame, max_distance: int = NEAR_DISTANCE) -> Findings:
    """Duplicates, leaks, missing and orphan files of a competition, from one scan of its images."""
    images = _image_table(comp, scan)
    images["near"] = near_groups(images["phash"], max_distance).where(lambda group: group >= 0)  # -1: no hash
    train = images[images["split"] == "train"]
    exact = _groups(train[train["digest"].notna()], "digest")
    near = [g for g in _groups(train[train["near"].notna()], "near") if g["digest"].nunique() > 1]
    leak = _across(images, "digest")
    out = Findings(images, exact, _conflicting(exact), leak, near, _conflicting(near),
                   _across(images, "near", exclude=set(leak["test_path"])))
    named = set(comp.train[PATH].dropna()) | set(comp.test[PATH].dropna())
    for split, table in (("train", comp.train), ("test", comp.test)):
        out.rows_without_images[split] = table.loc[table[PATH].isna(), comp.id_column].astype(str).tolist()
        files = comp.train_files if split == "train" else comp.test_files
        root = comp.layout.root / (comp.layout.train_dir if split == "train" else comp.layout.test_dir)
        out.images_without_rows[split] = [Path(f).relative_to(root).as_posix() for f in files if f not in named]
    return out


# ---------------------------------------------------------------------------- classes


def categories(comp: Competition, bins: int = 5) -> dict[str, pd.Index]:
    """Train row indices per class (binary, multiclass), per label (multilabel) or per quantile bin
    of the target (regression), in the classes' sorted order."""
    train, cols = comp.train, comp.target_columns
    if comp.task == "regression":
        values = pd.to_numeric(train[cols[0]], errors="coerce")
        binned = pd.qcut(values, q=min(bins, max(values.nunique(), 1)), duplicates="drop")
        return {f"{cols[0]} in {iv.left:.4g}..{iv.right:.4g}": train.index[binned == iv]
                for iv in binned.cat.categories}
    if comp.task == "multilabel" and len(cols) > 1:
        return {c: train.index[pd.to_numeric(train[c], errors="coerce") == 1] for c in cols}
    column = train[cols[0]].fillna("").astype(str).str.strip()
    if comp.task == "multilabel":
        tokens = column.str.split(comp.label_separator).map(lambda t: {x for x in t if x})
        labels = sorted(set().union(*tokens)) if len(tokens) else []
        out = {lab: train.index[tokens.map(lambda t, lab=lab: lab in t)] for lab in labels}
        empty = train.index[tokens.map(len) == 0]
        return {**out, "(no label)": empty} if len(empty) else out
    try:
        order = sorted(column.unique(), key=float)
    except ValueError:
        order = sorted(column.unique())
    return {c: train.index[column == c] for c in order if c}


# ---------------------------------------------------------------------------- the markdown


def _table(headers: list[str], rows: list[list]) -> list[str]:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""])


def _more(items: list, n: int = SHOWN) -> str:
    return f" (first {n} of {len(items)})" if len(items) > n else ""


def _counts(comp: Competition, f: Findings) -> list[str]:
    unreadable = f.unreadable
    rows = [["rows (table)", len(comp.train), len(comp.test)],
            ["image files", len(comp.train_files), len(comp.test_files)],
            ["rows without an image", len(f.rows_without_images["train"]), len(f.rows_without_images["test"])],
            ["images without a row", len(f.images_without_rows["train"]), len(f.images_without_rows["test"])],
            ["unreadable images", int((unreadable["split"] == "train").sum()),
             int((unreadable["split"] == "test").sum())]]
    return ["## Counts", ""] + _table(["", "train", "test"], rows)


def _targets(comp: Competition) -> list[str]:
    lines = ["## Targets", "", f"Task **{comp.task}**, target column(s) {', '.join(comp.target_columns)} "
             f"({comp.why.get('data.task', '')}).", ""]
    if comp.task == "regression":
        values = pd.to_numeric(comp.train[comp.target_columns[0]], errors="coerce")
        stats = values.describe()
        lines += _table(["count", "mean", "std", "min", "25%", "50%", "75%", "max"],
                        [[int(stats["count"])] + [f"{stats[k]:.4g}" for k in
                                                  ("mean", "std", "min", "25%", "50%", "75%", "max")]])
        if values.isna().any():
            lines += [f"{int(values.isna().sum())} rows have no numeric target.", ""]
    groups = categories(comp)
    total = len(comp.train)
    what = {"regression": "target bin", "multilabel": "label"}.get(comp.task, "class")
    rows = [[name, len(idx), f"{len(idx) / max(total, 1):.1%}"] for name, idx in groups.items()]
    shown, note = rows, ""
    if len(rows) > 2 * SHOWN:  # many classes: the most and the least frequent
        ranked = sorted(rows, key=lambda r: -r[1])
        shown, note = ranked[:SHOWN] + [["...", "", ""]] + ranked[-SHOWN:], f" ({SHOWN} largest, {SHOWN} smallest)"
    lines += [f"Rows per {what}, {len(rows)} in all{note}:", ""] + _table([what, "rows", "share"], shown)
    if comp.task in ("binary", "multiclass") and rows:
        counts = [r[1] for r in rows]
        lines += [f"Imbalance: the largest class has {max(counts) / max(min(counts), 1):.1f}x the rows of the "
                  f"smallest.", ""]
    return lines


def _value_counts(values: pd.Series, n: int = 6) -> str:
    counts = values.dropna().astype(str).value_counts()
    shown = ", ".join(f"{k} {v}" for k, v in counts.head(n).items())
    return shown + (f", {len(counts) - n} more" if len(counts) > n else "")


def _images(f: Findings) -> list[str]:
    rows = []
    for split in ("train", "test"):
        part = f.images[(f.images["split"] == split) & f.images["width"].notna()]
        if not len(part):
            rows.append([split, 0, "", "", "", "", "", ""])
            continue
        w, h = part["width"].astype(float), part["height"].astype(float)
        sizes = (part["width"].astype(str) + "x" + part["height"].astype(str))
        rows.append([split, len(part), f"{w.min():.0f} / {w.median():.0f} / {w.max():.0f}",
                     f"{h.min():.0f} / {h.median():.0f} / {h.max():.0f}", _value_counts(sizes, 3),
                     _value_counts(part["mode"]), _value_counts(part["format"]),
                     f"{part['bytes'].astype(float).sum() / 1e6:.1f} MB"])
    return (["## Images", ""] + _table(["split", "images", "width min / median / max", "height min / median / max",
                                        "most common sizes", "modes", "formats", "on disk"], rows))


def _group_rows(groups: list[pd.DataFrame]) -> list[list]:
    return [[len(g), ", ".join(map(str, g["id"].fillna("(no row)").tolist()[:6])) + (" ..." if len(g) > 6 else ""),
             ", ".join(sorted(set(g["label"].dropna().astype(str))))] for g in groups[:SHOWN]]


def _duplicates(f: Findings, comp: Competition) -> list[str]:
    lines = ["## Duplicates and leaks", ""]
    exact_images = sum(len(g) for g in f.exact_train_groups)
    lines += [f"**Exact duplicates inside train** (same bytes, BLAKE2b): {len(f.exact_train_groups)} groups "
              f"({exact_images} images); **{len(f.exact_conflicts)} with conflicting labels**"
              f"{_more(f.exact_conflicts)}.", ""]
    if f.exact_conflicts:
        lines += _table(["images", "ids", "labels"], _group_rows(f.exact_conflicts))
    lines += [f"**Exact duplicates between train and test** (a leak: the train label is known for these test "
              f"images): **{len(f.train_test_exact)} test images**{_more(list(f.train_test_exact.index))}.", ""]
    if len(f.train_test_exact):
        lines += _table(["test id", "train ids", "train labels"], _pair_rows(f.train_test_exact))
    lines += [f"**Near-duplicates** (perceptual hash, pHash 64 bits, at most {NEAR_DISTANCE} bits apart, not "
              f"byte-identical): inside train {len(f.near_train_groups)} groups "
              f"({sum(len(g) for g in f.near_train_groups)} images), **{len(f.near_conflicts)} with conflicting "
              f"labels**{_more(f.near_conflicts)}; **{len(f.train_test_near)} test images** near a train image.", ""]
    if f.near_conflicts:
        lines += _table(["images", "ids", "labels"], _group_rows(f.near_conflicts))
    if len(f.train_test_near):
        lines += _table(["test id", "train ids", "train labels"], _pair_rows(f.train_test_near))
    if comp.group_columns:
        lines += [f"Column(s) {', '.join(comp.group_columns)} repeat like group ids "
                  f"({comp.why.get('data.group_column', '')}); the config has a commented `group_column` line.", ""]
    return lines


def _pair_rows(pairs: pd.DataFrame) -> list[list]:
    return [[r.test_id, ", ".join(map(str, r.train_ids[:6])), ", ".join(map(str, r.train_labels))]
            for r in pairs.head(SHOWN).itertuples()]


def _listings(f: Findings) -> list[str]:
    lines = []
    unreadable = f.unreadable
    if len(unreadable):
        lines += [f"## Unreadable images{_more(list(unreadable.index))}", ""]
        lines += _table(["split", "file", "problem"], [[r.split, r.path, r.problem]
                                                       for r in unreadable.head(SHOWN).itertuples()])
    for title, found in (("Rows without an image", f.rows_without_images),
                         ("Images without a row", f.images_without_rows)):
        for split, items in found.items():
            if items:
                lines += [f"## {title} ({split}: {len(items)}){_more(items)}", "",
                          ", ".join(f"`{x}`" for x in items[:SHOWN]), ""]
    return lines


def _advice(f: Findings) -> list[str]:
    todo = []
    if any(f.rows_without_images.values()) or len(f.unreadable):
        todo.append("Rows without a (readable) image stop `make folds`: add the images or drop those rows.")
    if f.exact_conflicts or f.near_conflicts:
        todo.append("Duplicates with different labels: fix the labels, or drop the copies from the train table.")
    if len(f.train_test_exact) or len(f.train_test_near):
        todo.append("Test images that duplicate train images: their train labels are a strong prior; check "
                    "the competition's rules before using them.")
    if f.near_train_groups:
        todo.append("Near-duplicate groups inside train land in different folds unless grouped: an optimistic "
                    "CV. `folds.group_near_duplicates: true` keeps each in one fold (`init` sets it when the train "
                    "table has no group column it uses), joined with data.group_column's groups where there is one.")
    return ["## What to do", ""] + ([f"- {t}" for t in todo] or ["- Nothing stands out."]) + [""]


def write_report(comp: Competition, f: Findings, out_dir: Path, name: str, seconds: float) -> tuple[Path, Path]:
    """``data_report.md`` and ``data_report.png`` in ``out_dir``; returns both paths."""
    md, png = Path(out_dir) / REPORT_MD, Path(out_dir) / REPORT_PNG
    lines = [f"# Data report: {name}", "",
             f"`{comp.layout.root}`, written by `python -m pipeline init` ({seconds:.1f} s: every image file read "
             f"once for its hashes, size and a full decode). Examples per "
             f"{'target bin' if comp.task == 'regression' else 'class'}: [{REPORT_PNG}]({REPORT_PNG}).", ""]
    lines += _counts(comp, f) + _targets(comp) + _images(f) + _duplicates(f, comp) + _listings(f) + _advice(f)
    plot_examples(comp, png)
    artifacts.write_text(md, "\n".join(lines))
    return md, png


# ---------------------------------------------------------------------------- the picture


def thumbnail(path: str, size: int = 128) -> np.ndarray | None:
    """An RGB array of the image file at most ``size`` px a side; None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
            im.thumbnail((size, size))
            return np.asarray(im)
    except Exception:  # an unreadable file is listed in the report; the picture skips it
        return None


def plot_examples(comp: Competition, path: Path, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """A grid: one row per class (label, target bin), ``per_class`` random train images each."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    every = categories(comp)
    groups = list(every.items())[:MAX_ROWS_PNG]
    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(1.6 * per_class + 1.5, 1.6 * max(len(groups), 1)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(max(len(groups), 1), per_class, squeeze=False))
    for row, (name, index) in enumerate(groups):
        paths = comp.train.loc[index, PATH].dropna().to_numpy()
        chosen = rng.choice(paths, size=min(per_class, len(paths)), replace=False) if len(paths) else []
        for col in range(per_class):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            image = thumbnail(chosen[col]) if col < len(chosen) else None
            if image is not None:
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        axes[row, 0].set_ylabel(f"{name}\n({len(index)})", rotation=0, ha="right", va="center", fontsize=9)
    more = len(every) - len(groups)
    fig.suptitle(f"{comp.layout.root}: train images per {'target bin' if comp.task == 'regression' else 'class'}"
                 + (f" (first {len(groups)}; {more} more)" if more > 0 else ""), fontsize=10)
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return path


def refresh_report(comp: Competition, out_dir: Path, name: str) -> tuple[Findings, Path, Path]:
    """Scan every train and test image once (sizes, modes, hashes), find the problems and write
    ``out_dir/data_report.{md,png}``: what ``init`` writes, redone by the folds stage."""
    start = time.perf_counter()
    scan = scan_images(sorted(set(comp.train_files) | set(comp.test_files)))
    findings = find(comp, scan)
    md, png = write_report(comp, findings, out_dir, name, time.perf_counter() - start)
    return findings, md, png
