"""Image transforms (albumentations), test-time augmentation views, and the image cache.

Transforms produce uint8 CHW tensors; normalisation (the model's mean/std from timm's data
config) happens on the device in :func:`normalize`, so the loader ships 4x fewer bytes and the
CPU workers do no float maths.
"""
from __future__ import annotations

import difflib
from concurrent.futures import ThreadPoolExecutor

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

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


def build_user_transform(spec: dict, index: int) -> A.BasicTransform:
    spec = dict(spec)
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
    user = [build_user_transform(s, i) for i, s in enumerate(specs)]
    return A.Compose([_resize(size, interpolation, resize), *user, ToTensorV2()])


def eval_transform(size: int, interpolation: str, resize: str = "crop") -> A.Compose:
    """Deterministic: the image brought to ``size`` by the ``resize`` policy."""
    return A.Compose([_resize(size, interpolation, resize), ToTensorV2()])


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> float, scaled and standardised (mean/std shaped 1x3x1x1)."""
    return (x.float().div_(255.0) - mean) / std


class ImageCache:
    """Decoded images resized once to ``size``x``size``, held in one uint8 array.

    Serves the same pixels as reading the file and applying the deterministic resize, so the
    remaining transforms (and results) are unchanged; only file decoding and resizing are saved.
    """

    def __init__(self, paths, size: int, interpolation: str, threads: int = 4, resize: str = "crop"):
        from pipeline.data import load_image

        paths = list(paths)
        resize = _resize(size, interpolation, resize)
        self.array = np.empty((len(paths), size, size, 3), dtype=np.uint8)

        def fill(i: int) -> None:
            self.array[i] = resize(image=load_image(paths[i]))["image"]

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(fill, range(len(paths))))

    @staticmethod
    def bytes_needed(n_images: int, size: int) -> int:
        return n_images * size * size * 3

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[i]
