"""Reading competition data: the train table, the test table, images, and the folds file.

Two train layouts are read into the same table:

* CSV + image folder: ``data.train_csv`` holds ``data.id_column`` and the target column(s);
  images live in ``data.train_dir`` named by id, with or without the file extension;
* class sub-folders: ``data.train_csv: null`` and ``data.train_dir/<class>/<image>``; the id is
  ``<class>/<file stem>`` and the target column is ``data.target_columns[0]``.

The test set is the sample submission's ids with images in ``data.test_dir``. Every table
carries a ``_path`` column with the resolved image file; it is never written to the folds file.
"""
from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline import artifacts
from pipeline.config import Config
from pipeline.errors import PipelineError, first_few, quoted
from pipeline.paths import Paths
from pipeline.tasks import TaskSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PATH = "_path"


# ---------------------------------------------------------------------------- tables


def read_csv(path: Path, what: str, dtype=str, key: str | None = None) -> pd.DataFrame:
    """A CSV with every cell as text; only truly empty cells are missing (``None``, ``NA``, ``null``
    and ``nan`` are real ids and labels, not pandas' missing values)."""
    where = f" (config key {key})" if key else ""
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise PipelineError(f"{what} {path}{where}: {parent} is a file, not a folder; check data.root")
        raise PipelineError(f"{what} {path}{where} does not exist; check data.root and the file name in the config")
    if path.is_dir():
        raise PipelineError(f"{what} {path}{where} is a folder, not a file; point it at the CSV file")
    try:
        return pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=[""])
    except Exception as exc:  # pandas raises many types for malformed files
        line = " ".join(str(exc).split())
        raise PipelineError(f"{what} {path}{where} could not be read as CSV: {line}") from None


def require_columns(frame: pd.DataFrame, columns, source: Path | str, key: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PipelineError(f"{source} has no column {first_few(missing)} (config key {key}); "
                            f"its columns are: {first_few(list(frame.columns), 20)}")


def _check_ids(frame: pd.DataFrame, id_column: str, source) -> None:
    ids = frame[id_column]
    if ids.isna().any():
        rows = list(frame.index[ids.isna()] + 2)  # +2: header line and 1-based rows
        raise PipelineError(f"{source}: empty id in column '{id_column}' at lines {first_few(rows)}")
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        raise PipelineError(f"{source}: duplicate ids in column '{id_column}': {quoted(dup.unique())} "
                            f"({dup.nunique()} ids repeated); each image must appear once")
    stripped = ids.astype(str).str.strip()
    near = ids[stripped.duplicated(keep=False)]
    if len(near):  # '1' and '1 ': two ids to pandas, one to whoever wrote the table
        raise PipelineError(f"{source}: ids in column '{id_column}' differ only by surrounding spaces: "
                            f"{quoted(near)}; remove the spaces so that each image appears once")


def _strip_labels(table: pd.DataFrame, columns) -> None:
    """Labels without surrounding spaces (``'1 '`` is class ``'1'``); a cell of spaces only is empty."""
    for col in columns:
        values = table[col].str.strip()
        table[col] = values.mask(values == "")


def _image_index(directory: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map both file names and stems of the images in ``directory`` to their names; and the stems
    that more than one image shares (``x.png`` and ``x.jpg``) to those names."""
    index: dict[str, str] = {}
    shared: dict[str, list[str]] = {}
    if not directory.is_dir():
        return index, shared
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                index[name] = name
                if stem in index and index[stem] != name and stem not in (name,):
                    shared.setdefault(stem, [index[stem]]).append(name)
                index.setdefault(stem, name)
    return index, shared


def resolve_image_paths(ids: pd.Series, directory: Path, extension: str | None, source) -> pd.Series:
    """Image file for each id (ids with or without extension); error listing missing ones."""
    if directory.exists() and not directory.is_dir():
        raise PipelineError(f"image folder {directory} (for {source}) is a file, not a folder; "
                            f"check data.root, data.train_dir and data.test_dir")
    if not directory.is_dir():
        raise PipelineError(f"image folder {directory} does not exist (for {source}); "
                            f"check data.root, data.train_dir and data.test_dir")
    index, shared = _image_index(directory)
    paths, missing, ambiguous = [], [], []
    suffix = None if not extension else (extension if extension.startswith(".") else "." + extension)
    for image_id in ids.astype(str):
        name = image_id if image_id in index and index[image_id] == image_id else None  # the file name itself
        if name is None and suffix and (directory / (image_id + suffix)).is_file():
            name = image_id + suffix
        if name is None and image_id in shared:
            ambiguous.append(f"{image_id!r} ({' and '.join(shared[image_id])})")
            continue
        if name is None:
            name = index.get(image_id)
        if name is None and (directory / image_id).is_file():  # ids with sub-paths
            name = image_id
        if name is None:
            missing.append(image_id)
        paths.append(str(directory / name) if name else None)
    if ambiguous:
        raise PipelineError(f"{len(ambiguous)} ids in {source} match more than one image in {directory}: "
                            f"{first_few(ambiguous)}; keep one file per id, or set data.image_extension")
    if missing:
        spaced = [i for i in missing if i != i.strip()]
        hint = f" ({len(spaced)} of them have surrounding spaces: remove them in the table)" if spaced else ""
        raise PipelineError(f"{len(missing)} ids in {source} have no image in {directory}: {quoted(missing)}{hint}; "
                            f"add the images or remove those rows (data.image_extension if ids lack one)")
    return pd.Series(paths, index=ids.index)


OPENCV_MAX_PIXELS = 1 << 30  # OpenCV's own default limit (OPENCV_IO_MAX_IMAGE_PIXELS)


def set_image_limit(cfg: Config) -> None:
    """``data.max_image_pixels`` as the decoders' limit: Pillow's ``MAX_IMAGE_PIXELS`` (its
    decompression-bomb check), and OpenCV's ``OPENCV_IO_MAX_IMAGE_PIXELS`` when the key allows more
    than OpenCV's default (read when cv2 loads: it reaches loader and fold processes started later;
    here cv2's refusal falls back to Pillow in :func:`load_image`)."""
    limit = cfg.data.max_image_pixels
    Image.MAX_IMAGE_PIXELS = limit
    if limit is None or limit > OPENCV_MAX_PIXELS:
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(limit or 1 << 62)


def _pixels_in(message: str) -> int | None:
    """The pixel count in Pillow's "Image size (N pixels) exceeds limit ..." message."""
    found = re.search(r"\((\d+) pixels\)", message)
    return int(found.group(1)) if found else None


def _image_problem(path: str) -> int | str | None:
    """None when the whole image decodes; its pixel count when it is over the limit
    (``data.max_image_pixels``, checked before decoding); "unreadable" otherwise: a truncated file
    (half a JPEG) fails here, where reading only the header, or OpenCV, would give a partly grey
    image and a warning."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            pixels = im.size[0] * im.size[1]
            if limit is not None and pixels > limit:
                return pixels
            if im.format == "JPEG":
                im.draft("RGB", (64, 64))  # DCT scaling: every byte is still decoded, 10x faster
            im.load()
        return None
    except Image.DecompressionBombError as exc:  # over twice the limit: Pillow refuses to open it
        return _pixels_in(str(exc)) or (limit or 0) + 1
    except Exception:
        return "unreadable"


def _too_large(frame: pd.DataFrame, id_column: str, pixels: pd.Series, source) -> PipelineError:
    limit = Image.MAX_IMAGE_PIXELS
    shown = [f"{str(i)!r} ({p}) is {n / 1e6:.3g} megapixels" for i, p, n in zip(frame[id_column], frame[PATH], pixels)]
    if len(shown) == 1:
        return PipelineError(f"image {shown[0]}, over data.max_image_pixels = {limit}; raise it (or set null) if "
                             f"the image is genuine")
    return PipelineError(f"{len(shown)} images for {source} are over data.max_image_pixels = {limit}: "
                         f"{first_few(shown, 3)}; raise it (or set null) if the images are genuine")


def _verified_stamp(frame: pd.DataFrame, stamp_dir: Path) -> Path:
    """Where a passed check of exactly these files (path, size, modification time, and the pixel
    limit) is recorded: stat calls only, so a re-run or a fold process skips decoding them again."""
    stats = [(p, st.st_size, st.st_mtime_ns) for p in frame[PATH] for st in [os.stat(p)]]
    return stamp_dir / f"images-{artifacts.fingerprint({'files': stats, 'limit': Image.MAX_IMAGE_PIXELS})[:24]}"


def check_images_readable(frame: pd.DataFrame, id_column: str, source, stamp_dir: Path | None = None) -> None:
    """Decode every image completely (threads: Pillow releases the GIL); error listing unreadable ones
    and, first, those over ``data.max_image_pixels`` (not decoded; Pillow's own warning is not shown).
    With ``stamp_dir``, a set of files that :func:`record_verified` recorded (unchanged since) is not
    decoded again."""
    if stamp_dir is not None and _verified_stamp(frame, stamp_dir).exists():
        return
    _decode_all(frame, id_column, source)


def record_verified(frame: pd.DataFrame, stamp_dir: Path) -> None:
    """Stamp a checked image set, once the stage has validated everything and starts writing."""
    artifacts.write_text(_verified_stamp(frame, stamp_dir), f"{len(frame)} images decoded completely\n")


def _decode_all(frame: pd.DataFrame, id_column: str, source) -> None:
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=8) as pool:  # filters: process-wide
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        problems = pd.Series(list(pool.map(_image_problem, frame[PATH])), index=frame.index, dtype=object)
    large = problems.map(lambda v: isinstance(v, int))
    if large.any():
        raise _too_large(frame.loc[large], id_column, problems[large], source)
    rows = frame.loc[problems.notna().to_numpy()]
    if len(rows):
        shown = (f"{str(i)!r} ({os.path.basename(p)})" for i, p in zip(rows[id_column], rows[PATH]))
        raise PipelineError(f"{len(rows)} images for {source} cannot be read as images (unreadable, truncated "
                            f"or corrupt): {first_few(shown)}; replace or remove them")


def _read_class_folders(cfg: Config, paths: Paths) -> pd.DataFrame:
    root = paths.train_dir
    if root.exists() and not root.is_dir():
        raise PipelineError(f"train folder {root} (config keys data.root, data.train_dir) is a file, not a folder")
    if not root.is_dir():
        raise PipelineError(f"train folder {root} does not exist; set data.root/data.train_dir, "
                            f"or data.train_csv for the CSV layout")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(class_dir.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                rows.append((f"{class_dir.name}/{image.stem}", class_dir.name, str(image)))
    if not rows:
        raise PipelineError(f"train folder {root} has no class sub-folders with images "
                            f"({', '.join(IMAGE_SUFFIXES)}); for a CSV layout set data.train_csv")
    table = pd.DataFrame(rows, columns=[cfg.data.id_column, cfg.data.target_columns[0], PATH])
    twins = table[table[cfg.data.id_column].duplicated(keep=False)]
    if len(twins):  # x.png and x.jpg in one class folder: one id, two images
        shown = [" and ".join(Path(p).name for p in group[PATH]) for _, group in twins.groupby(cfg.data.id_column)]
        raise PipelineError(f"{len(shown)} ids in {root} match more than one image: {first_few(shown)} "
                            f"(ids {quoted(twins[cfg.data.id_column].unique())}); keep one file per id")
    return table


def read_train_table(cfg: Config, check_readable: bool = True) -> pd.DataFrame:
    """The validated train table: id, target column(s), optional group column, ``_path``."""
    paths, d = Paths(cfg), cfg.data
    set_image_limit(cfg)
    if d.train_csv is None:
        table = _read_class_folders(cfg, paths)
        source = paths.train_dir
    else:
        source = paths.train_csv
        table = read_csv(source, "train table", key="data.train_csv")
        require_columns(table, [d.id_column], source, "data.id_column")
        require_columns(table, d.target_columns, source, "data.target_columns")
        if d.group_column:
            require_columns(table, [d.group_column], source, "data.group_column")
        table[PATH] = None
        _strip_labels(table, [*d.target_columns] + ([d.group_column] if d.group_column else []))
    _check_ids(table, d.id_column, source)
    _check_targets(table, cfg, source)
    if d.train_csv is not None:
        table[PATH] = resolve_image_paths(table[d.id_column], paths.train_dir, d.image_extension, source)
    if check_readable:
        check_images_readable(table, d.id_column, source, verified_dir(cfg))
    return table.reset_index(drop=True)


def _check_targets(table: pd.DataFrame, cfg: Config, source) -> None:
    d = cfg.data
    multilabel_text = d.task == "multilabel" and len(d.target_columns) == 1
    for col in d.target_columns:
        if multilabel_text:  # an empty cell means "no labels"
            continue
        nan = table[col].isna()
        if nan.any():
            rows = table.loc[nan, d.id_column].tolist()
            raise PipelineError(f"{source}: target column '{col}' is empty for {nan.sum()} rows, ids "
                                f"{quoted(rows)}; fill or drop those rows")
    if d.group_column:
        nan = table[d.group_column].isna()
        if nan.any():
            raise PipelineError(f"{source}: group column '{d.group_column}' is empty for ids "
                                f"{quoted(table.loc[nan, d.id_column])}; fill or drop those rows")


def read_test_table(cfg: Config, check_readable: bool = True) -> pd.DataFrame:
    """The sample submission's ids, in its order, with their test image paths."""
    paths, d = Paths(cfg), cfg.data
    set_image_limit(cfg)
    source = paths.sample_submission
    sample = read_csv(source, "sample submission", key="data.sample_submission")
    require_columns(sample, [d.id_column], source, "data.id_column")
    if sample.empty:
        raise PipelineError(f"sample submission {source} (config key data.sample_submission) has a header and no "
                            f"rows; it defines the test ids: use the competition's sample_submission.csv")
    _check_ids(sample, d.id_column, source)
    table = sample[[d.id_column]].copy()
    table[PATH] = resolve_image_paths(table[d.id_column], paths.test_dir, d.image_extension, source)
    if check_readable:
        check_images_readable(table, d.id_column, source, verified_dir(cfg))
    return table


def verified_dir(cfg: Config) -> Path:
    """Stamps of image sets that decoded completely (see :func:`check_images_readable`)."""
    return Path(cfg.runs_dir) / ".verified"


def task_spec(cfg: Config, table: pd.DataFrame) -> TaskSpec:
    d = cfg.data
    return TaskSpec.from_table(table, d.task, d.target_columns, d.classes, d.label_separator, d.id_column,
                               d.positive_class)


# ---------------------------------------------------------------------------- folds file

REMAKE_FOLDS = "remake them with `make folds CONFIG=... ARGS=--force` (python -m pipeline folds -c CFG --force)"


def _check_folds_current(folds: pd.DataFrame, train: pd.DataFrame, cfg: Config, source) -> None:
    """The folds file's targets and groups must still equal the train table's: every stage trains
    and scores on the folds file's copy, so a label corrected in train.csv after `make folds`
    would otherwise be silently ignored (and a changed group could leak across folds)."""
    d = cfg.data
    columns = [*d.target_columns] + ([d.group_column] if d.group_column else [])
    if d.group_column and d.group_column not in folds.columns:
        raise PipelineError(f"{source} has no group column '{d.group_column}' (data.group_column): it was made "
                            f"without groups; {REMAKE_FOLDS}")
    current = train.set_index(d.id_column).loc[folds[d.id_column], columns]
    for col in columns:
        old = folds[col].fillna("").astype(str).to_numpy()
        new = current[col].fillna("").astype(str).to_numpy()
        differ = np.flatnonzero(old != new)
        if len(differ):
            i = differ[0]
            ids = folds[d.id_column].to_numpy()[differ]
            raise PipelineError(f"{source} is stale: column '{col}' differs from the train table for {len(differ)} "
                                f"rows, ids {first_few(map(repr, ids))} (id {ids[0]!r}: {old[i]!r} in the folds file, "
                                f"{new[i]!r} in the train table); {REMAKE_FOLDS}")


def read_folds(cfg: Config) -> pd.DataFrame:
    """The folds file joined with image paths; checks its contract against the train table."""
    paths, d = Paths(cfg), cfg.data
    source = paths.folds_csv
    if not source.exists():
        raise PipelineError(f"folds file {source} does not exist; run `make folds CONFIG=...` first")
    folds = read_csv(source, "folds file")
    require_columns(folds, [d.id_column, *d.target_columns, "fold"], source, "folds file contract")
    train = read_train_table(cfg, check_readable=False)
    if len(folds) != len(train) or set(folds[d.id_column]) != set(train[d.id_column]):
        raise PipelineError(f"{source} does not match the train table ({len(folds)} vs {len(train)} rows); "
                            f"the data changed: {REMAKE_FOLDS}")
    _check_folds_current(folds, train, cfg, source)
    folds["fold"] = folds["fold"].astype(int)
    return folds.merge(train[[d.id_column, PATH]], on=d.id_column, how="left", validate="one_to_one")


# ---------------------------------------------------------------------------- images


REDUCING_GAP = 2.0  # a reduced JPEG decode keeps at least this many source pixels per output pixel
_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}


def decode_reduction(width: int, height: int, size: int, resize: str = "crop", gap: float = REDUCING_GAP) -> int:
    """The DCT scale (1, 2, 4 or 8) at which to decode a ``width`` x ``height`` JPEG that the
    ``resize`` policy then brings to ``size``: the largest whose reduced image still has ``gap``
    source pixels per output pixel along the side the policy fits (the shorter side for ``crop``
    and ``squash``, the longer for ``pad``), so the exact resize that follows sees a fair
    resample, as Pillow's ``thumbnail(reducing_gap=2.0)`` does.

    >>> decode_reduction(4000, 3000, 224), decode_reduction(500, 500, 224), decode_reduction(500, 500, 224, gap=1)
    (4, 1, 2)
    """
    side = max(width, height) if resize == "pad" else min(width, height)
    return next((f for f in (8, 4, 2) if side / f >= gap * size), 1)


def load_image(path: str, size: int | None = None, resize: str = "crop", gap: float = REDUCING_GAP) -> np.ndarray:
    """An RGB uint8 HxWx3 array; a clear error for an unreadable file.

    With ``size`` (the side the ``resize`` policy brings the image to next), a JPEG at least
    ``2 x gap`` times larger is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling
    (:func:`decode_reduction`; OpenCV's ``IMREAD_REDUCED_COLOR_*``): decoding is the largest
    cost of a big photo, and the exact resize that follows still sees ``gap`` source pixels per
    output pixel. Only the header is read to decide (Pillow, lazily)."""
    flag = cv2.IMREAD_COLOR
    if size is not None:
        try:
            with Image.open(path) as im:
                if im.format == "JPEG":
                    flag = _REDUCED.get(decode_reduction(*im.size, size, resize, gap), flag)
        except Exception:  # not an image Pillow knows: the full decode below says what is wrong
            pass
    image = cv2.imread(path, flag)
    if image is None:  # cv2 cannot read it (e.g. some GIF/WebP variants): try Pillow
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except Exception:
            raise PipelineError(f"image {path} cannot be read; replace or remove it and its row") from None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ImageDataset(torch.utils.data.Dataset):
    """Images with optional targets, through an albumentations transform.

    ``cache`` (a :class:`pipeline.augment.ImageCache` or None) serves decoded, pre-resized
    images from memory instead of reading files. ``decode`` (``(size, resize policy)`` or None)
    lets :func:`load_image` decode large JPEGs at reduced scale before the transform's resize,
    as the cache does: the same pixels with or without it.
    """

    def __init__(self, paths, targets=None, transform=None, cache=None, decode: tuple[int, str] | None = None):
        self.paths = list(paths)
        self.targets = None if targets is None else np.asarray(targets)
        self.transform = transform
        self.cache = cache
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        """``item``: a row, or ``(row, epoch_seed)`` from :class:`SeededSampler`, which seeds the
        transform from both: a row's augmentation then depends on the epoch and the row only, not
        on the number of loader workers or on which of them loads it."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        if self.cache is not None:
            image = self.cache[i]
        else:
            image = load_image(self.paths[i], *(self.decode or ()))
        if self.transform is not None:
            if seed is not None:
                seed_transform(self.transform, row_seed(seed, i))
            image = self.transform(image=image)["image"]
        target = self.targets[i] if self.targets is not None else np.float32(0)
        return image, target


SEEDING_NEEDS = "albumentations >= 1.4.21 (Compose.set_random_seed)"


def require_seedable_transforms() -> None:
    """Per-row augmentation seeding needs ``Compose.set_random_seed``. Without it a row's
    augmentation would depend on the loader worker that draws it, and a resumed run would differ
    from an uninterrupted one: refuse instead of skipping the seeding silently."""
    import albumentations

    if not hasattr(albumentations.Compose, "set_random_seed"):
        raise PipelineError(f"per-row augmentation seeding needs {SEEDING_NEEDS}; installed albumentations "
                            f"{albumentations.__version__}: pip install 'albumentations>=1.4.21'")


def seed_transform(transform, seed: int) -> None:
    """Seed one transform (see :func:`require_seedable_transforms`); an error when it cannot be."""
    setter = getattr(transform, "set_random_seed", None)
    if setter is None:
        raise PipelineError(f"transform {type(transform).__name__} cannot be seeded per row: it needs "
                            f"{SEEDING_NEEDS}; pip install 'albumentations>=1.4.21'")
    setter(seed)


def row_seed(epoch_seed: int, row: int) -> int:
    """A 32-bit seed for one row in one epoch (a multiplicative hash: distinct rows, distinct seeds)."""
    return (int(epoch_seed) * 0x9E3779B1 + int(row) * 0x85EBCA77 + 1) % 2**32


class SeededSampler(torch.utils.data.Sampler):
    """Rows as ``(row, epoch_seed)`` pairs, shuffled by the epoch seed (``set_epoch``).

    The sampler runs in the main process, so one DataLoader with persistent workers serves every
    epoch: the new order and seed reach the workers through the indices. Under DDP it wraps
    :class:`~torch.utils.data.distributed.DistributedSampler` (each rank its shard).
    """

    def __init__(self, n: int, distributed: bool = False, drop_last: bool = False):
        require_seedable_transforms()  # in the main process, before any worker starts
        self.n, self.seed = n, 0
        self.inner = None
        if distributed:
            from torch.utils.data.distributed import DistributedSampler
            self.inner = DistributedSampler(range(n), shuffle=True, seed=0, drop_last=drop_last)

    def set_epoch(self, seed: int) -> None:
        self.seed = int(seed)
        if self.inner is not None:
            self.inner.set_epoch(self.seed)  # its permutation is seeded by seed + epoch = this seed

    def __iter__(self):
        if self.inner is not None:
            order = list(self.inner)
        else:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return ((i, self.seed) for i in order)

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else self.n
