"""Image transforms (albumentations), test-time augmentation views, and the image cache.

Transforms produce uint8 CHW tensors; normalisation (the model's mean/std from timm's data
config) happens on the device in :func:`normalize`, so the loader ships 4x fewer bytes and the
CPU workers do no float maths.
"""
from __future__ import annotations

import difflib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from pipeline import artifacts
from pipeline.errors import PipelineError

INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
                 "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}

# Test-time augmentation views, applied to a whole NCHW batch on the device.
TTA_VIEWS = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(3),
    "vflip": lambda x: x.flip(2),
    "hvflip": lambda x: x.flip(2).flip(3),
    "rot90": lambda x: x.rot90(1, (2, 3)),
    "rot270": lambda x: x.rot90(3, (2, 3)),
    "transpose": lambda x: x.transpose(2, 3),
}


RESIZE_POLICIES = ("crop", "squash", "pad")


def _resize(size: int, interpolation: str, policy: str = "crop") -> A.BasicTransform:
    """Any image to ``size`` x ``size``: ``crop`` scales the shorter side to ``size`` and takes the
    centre (aspect ratio kept, the long side's edges lost), ``squash`` scales both sides (nothing
    lost, shapes distorted), ``pad`` scales the longer side and pads with black (nothing lost or
    distorted, a smaller object). Square images give the same pixels under all three."""
    interp = INTERPOLATION.get(interpolation, cv2.INTER_CUBIC)
    if policy == "squash":
        return A.Resize(size, size, interpolation=interp)
    if policy == "crop":
        return A.Compose([A.SmallestMaxSize(max_size=size, interpolation=interp), A.CenterCrop(size, size)])
    return A.Compose([A.LongestMaxSize(max_size=size, interpolation=interp),
                      A.PadIfNeeded(size, size, border_mode=cv2.BORDER_CONSTANT, fill=0)])


SIZE_PLACEHOLDER = "{image_size}"  # in a transform's arguments: the model variant's input size


def with_image_size(value, size: int):
    """``value`` with every ``"{image_size}"`` (also inside lists) replaced by ``size``, so that one
    augmentation list serves variants of several sizes (``size: ["{image_size}", "{image_size}"]``)."""
    if value == SIZE_PLACEHOLDER:
        return size
    if isinstance(value, (list, tuple)):
        return [with_image_size(v, size) for v in value]
    return value


def build_user_transform(spec: dict, index: int, size: int = 224) -> A.BasicTransform:
    """One ``augment.train`` entry as an albumentations transform (``size`` fills ``{image_size}``)."""
    spec = {k: with_image_size(v, size) for k, v in spec.items()}
    name = spec.pop("name")
    cls = getattr(A, str(name), None)
    if not isinstance(cls, type):
        close = difflib.get_close_matches(str(name), [n for n in dir(A) if n[:1].isupper()], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see albumentations' list of transforms"
        raise PipelineError(f"config key augment.train[{index}]: '{name}' is not an albumentations transform{hint}")
    try:
        return cls(**spec)
    except Exception as exc:
        raise PipelineError(f"config key augment.train[{index}] ({name}): bad arguments {spec}: {exc}") from None


def train_transform(specs: list[dict], size: int, interpolation: str, resize: str = "crop") -> A.Compose:
    user = [build_user_transform(s, i, size) for i, s in enumerate(specs)]
    return A.Compose([_resize(size, interpolation, resize), *user, ToTensorV2()])


def eval_transform(size: int, interpolation: str, resize: str = "crop") -> A.Compose:
    """Deterministic: the image brought to ``size`` by the ``resize`` policy."""
    return A.Compose([_resize(size, interpolation, resize), ToTensorV2()])


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> float, scaled and standardised (mean/std shaped 1x3x1x1)."""
    return (x.float().div_(255.0) - mean) / std


class ImageCache:
    """Decoded images resized once to ``size``x``size``, held in one uint8 array (N, size, size, 3).

    Serves the same pixels as reading the file (large JPEGs at reduced scale, as
    :func:`pipeline.data.load_image` does) and applying the deterministic resize, so the remaining
    transforms (and results) are unchanged; only file decoding and resizing are saved.

    ``ImageCache(paths, ...)`` decodes into memory. The train stage uses the file form instead:
    :meth:`file_for` names one ``.npy`` per (image files, size, interpolation, resize policy),
    :meth:`build` writes it once (decoded by threads into a temporary file, then renamed into
    place: a crash leaves no half file, and of two processes racing the first rename wins with the
    same bytes), and :meth:`open` memory-maps it read-only, so every fold, tune trial, prediction
    pass and parallel process shares one copy through the OS page cache.
    """

    VERSION = 2  # in the file key: bump when the decode or the resize changes

    def __init__(self, paths, size: int, interpolation: str, threads: int | None = None, resize: str = "crop"):
        paths = list(paths)
        self.array = np.empty((len(paths), size, size, 3), dtype=np.uint8)
        self.path = None
        _fill(self.array, paths, size, interpolation, resize, threads)

    @classmethod
    def file_for(cls, directory, paths, size: int, interpolation: str, resize: str = "crop"):
        """The cache file of these image files (path, byte size, modification time) at this size."""
        stats = [(p, st.st_size, st.st_mtime_ns) for p in map(str, paths) for st in [os.stat(p)]]
        key = artifacts.fingerprint({"files": stats, "size": size, "interpolation": interpolation,
                                     "resize": resize, "version": cls.VERSION})
        return Path(directory) / f"images-{size}px-{key[:20]}.npy"

    @staticmethod
    def build(path, paths, size: int, interpolation: str, resize: str = "crop", threads: int | None = None) -> bool:
        """Write the cache file ``path`` unless it exists; True when this call wrote it."""
        path = Path(path)
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        paths = list(paths)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=artifacts.TMP_SUFFIX)
        os.close(fd)
        try:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
            _fill(array, paths, size, interpolation, resize, threads)
            array.flush()
            del array
            if path.exists():  # another process finished first: keep its file (the same bytes)
                return False
            os.replace(tmp, path)
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def open(cls, path) -> "ImageCache":
        """The cache file ``path``, memory-mapped read-only."""
        cache = cls.__new__(cls)
        cache.path, cache.array = path, np.load(path, mmap_mode="r")
        return cache

    def __getstate__(self):  # loader workers started by spawn map the file again rather than copy it
        return {"path": self.path} if self.path is not None else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "array" not in state:
            self.array = np.load(state["path"], mmap_mode="r")

    @staticmethod
    def bytes_needed(n_images: int, size: int) -> int:
        return n_images * size * size * 3

    @staticmethod
    def fits_on_disk(path, n_images: int, size: int) -> bool:
        """Whether the cache file would take at most half the free space where it goes."""
        import shutil

        folder = next(p for p in Path(path).absolute().parents if p.exists())
        return ImageCache.bytes_needed(n_images, size) <= shutil.disk_usage(folder).free // 2

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array(self.array[i])  # a writable copy: a transform may work in place, the file is read-only


def _fill(array: np.ndarray, paths: list, size: int, interpolation: str, policy: str, threads: int | None) -> None:
    """Decode and resize every image into ``array`` (threads: OpenCV releases the GIL)."""
    from pipeline.data import load_image

    resize = _resize(size, interpolation, policy)

    def fill(i: int) -> None:
        array[i] = resize(image=load_image(paths[i], size, policy))["image"]

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        list(pool.map(fill, range(len(paths))))
