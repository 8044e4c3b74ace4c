"""Image files: the checks that every image decodes (with stamps that spare a re-run the
decode), the pixel limit, and reading one image (reduced JPEG decoding)."""
from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config.schema import Config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError, first_few

PATH = "_path"

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


@contextmanager
def restored_image_limit():
    """The decoders' pixel limits as they were before a stage set them (:func:`set_image_limit`)."""
    pillow, opencv = Image.MAX_IMAGE_PIXELS, os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = pillow
        if opencv is None:
            os.environ.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)
        else:
            os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = opencv


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


def verified_dir(cfg: Config) -> Path:
    """Stamps of image sets that decoded completely (see :func:`check_images_readable`)."""
    return Path(cfg.runs_dir) / ".verified"


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
