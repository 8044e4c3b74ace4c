"""Image transforms by name: the resize policies, ``augment.train`` entries as albumentations
transforms, and the test-time augmentation views applied to whole batches."""
from __future__ import annotations

import difflib

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2

from pipeline.core.errors import PipelineError

INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
                 "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}


ZOOM = 0.8  # the ``zoom`` view: the central 80% of each side, resized back to the full size


def _zoom(x: torch.Tensor) -> torch.Tensor:
    """The central ``ZOOM`` share of each side of an NCHW batch, resized back (bilinear): a crop view,
    closer in, as the train augmentation's random crops show the model."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * ZOOM)), max(1, round(w * ZOOM))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    return torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


# Test-time augmentation views, applied to a whole NCHW batch on the device.
TTA_VIEWS = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(3),
    "vflip": lambda x: x.flip(2),
    "hvflip": lambda x: x.flip(2).flip(3),
    "rot90": lambda x: x.rot90(1, (2, 3)),
    "rot270": lambda x: x.rot90(3, (2, 3)),
    "transpose": lambda x: x.transpose(2, 3),
    "zoom": _zoom,
}


RESIZE_POLICIES = ("crop", "squash", "pad")


def scaled_side(size: int, crop_pct: float = 1.0) -> int:
    """The side an image is scaled to before the central ``size`` x ``size`` is kept: ``size /
    crop_pct``, as timm's eval transform computes it (``crop_pct`` 0.875 at 224 px: 256)."""
    return size if crop_pct >= 1.0 else int(size / crop_pct)


def resize_transform(size: int, interpolation: str, policy: str = "crop", crop_pct: float = 1.0) -> A.BasicTransform:
    """Any image to ``size`` x ``size``: ``crop`` scales the shorter side to ``size`` and takes the
    centre (aspect ratio kept, the long side's edges lost), ``squash`` scales both sides (nothing
    lost, shapes distorted), ``pad`` scales the longer side and pads with black (nothing lost or
    distorted, a smaller object). Square images give the same pixels under all three.

    ``crop_pct`` below 1 (``crop`` and ``squash``): the image is first scaled to ``size / crop_pct``
    and its central ``size`` x ``size`` kept, the framing a timm backbone was evaluated with in
    pretraining (its pretrained config's ``crop_pct``, e.g. 0.875): the border goes, the object
    fills more of the input. Shrinking uses area interpolation (anti-aliased, as Pillow's resize
    in timm's transform is); enlarging uses ``interpolation``."""
    interp = INTERPOLATION.get(interpolation, cv2.INTER_CUBIC)
    side = scaled_side(size, crop_pct) if policy != "pad" else size
    if policy == "squash":
        scale = A.Resize(side, side, interpolation=interp, area_for_downscale="image")
        return scale if side == size else A.Compose([scale, A.CenterCrop(size, size)])
    if policy == "crop":
        return A.Compose([A.SmallestMaxSize(max_size=side, interpolation=interp, area_for_downscale="image"),
                          A.CenterCrop(size, size)])
    return A.Compose([A.LongestMaxSize(max_size=size, interpolation=interp, area_for_downscale="image"),
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


def train_transform(specs: list[dict], size: int, interpolation: str, resize: str = "crop",
                    crop_pct: float = 1.0) -> A.Compose:
    user = [build_user_transform(s, i, size) for i, s in enumerate(specs)]
    return A.Compose([resize_transform(size, interpolation, resize, crop_pct), *user, ToTensorV2()])


def eval_transform(size: int, interpolation: str, resize: str = "crop", crop_pct: float = 1.0) -> A.Compose:
    """Deterministic: the image brought to ``size`` by the ``resize`` policy (and ``crop_pct``)."""
    return A.Compose([resize_transform(size, interpolation, resize, crop_pct), ToTensorV2()])


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> float, scaled and standardised (mean/std shaped 1x3x1x1)."""
    return (x.float().div_(255.0) - mean) / std
