"""Image transforms (albumentations), test-time augmentation views, and the image cache.

Transforms produce uint8 CHW tensors; normalisation (the model's mean/std from timm's data
config) happens on the device in :func:`normalize`, so the loader ships 4x fewer bytes and the
CPU workers do no float maths.
"""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.core import artifacts
from pipeline.domain.transforms import resize_transform, scaled_side


class ImageCache:
    """Decoded images resized once to ``size``x``size``, held in one uint8 array (N, size, size, 3).

    Serves the same pixels as reading the file (large JPEGs at reduced scale, as
    :func:`pipeline.data.images.load_image` does) and applying the deterministic resize, so the remaining
    transforms (and results) are unchanged; only file decoding and resizing are saved.

    ``ImageCache(paths, ...)`` decodes into memory. The train stage uses the file form instead:
    :meth:`file_for` names one ``.npy`` per (image files, size, interpolation, resize policy),
    :meth:`build` writes it once (decoded by threads into a temporary file, then renamed into
    place: a crash leaves no half file, and of two processes racing the first rename wins with the
    same bytes), and :meth:`open` memory-maps it read-only, so every fold, tune trial, prediction
    pass and parallel process shares one copy through the OS page cache.
    """

    VERSION = 3  # in the file key: bump when the decode or the resize changes (3: area when shrinking)

    def __init__(self, paths, size: int, interpolation: str, threads: int | None = None, resize: str = "crop",
                 crop_pct: float = 1.0):
        paths = list(paths)
        self.array = np.empty((len(paths), size, size, 3), dtype=np.uint8)
        self.path = None
        _fill(self.array, paths, size, interpolation, resize, threads, crop_pct)

    @classmethod
    def file_for(cls, directory, paths, size: int, interpolation: str, resize: str = "crop", crop_pct: float = 1.0):
        """The cache file of these image files (path, byte size, modification time) at this size."""
        stats = [(p, st.st_size, st.st_mtime_ns) for p in map(str, paths) for st in [os.stat(p)]]
        key = artifacts.fingerprint({"files": stats, "size": size, "interpolation": interpolation,
                                     "resize": resize, "version": cls.VERSION,
                                     **({"crop_pct": crop_pct} if crop_pct < 1.0 else {})})
        return Path(directory) / f"images-{size}px-{key[:20]}.npy"

    @staticmethod
    def build(path, paths, size: int, interpolation: str, resize: str = "crop", threads: int | None = None,
              crop_pct: float = 1.0) -> bool:
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
            _fill(array, paths, size, interpolation, resize, threads, crop_pct)
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


def _fill(array: np.ndarray, paths: list, size: int, interpolation: str, policy: str, threads: int | None,
          crop_pct: float = 1.0) -> None:
    """Decode and resize every image into ``array`` (threads: OpenCV releases the GIL)."""
    from pipeline.data.images import load_image

    resize = resize_transform(size, interpolation, policy, crop_pct)
    side = scaled_side(size, crop_pct)

    def fill(i: int) -> None:
        array[i] = resize(image=load_image(paths[i], side, policy))["image"]

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        list(pool.map(fill, range(len(paths))))
