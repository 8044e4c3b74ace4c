"""One pass over image files: each file is read once, and from those bytes come its exact hash
(BLAKE2b of the bytes), its header facts (size, mode, format), whether it decodes completely, and
its perceptual hash (imagehash's pHash: a 64-bit DCT hash of a 32x32 grayscale thumbnail, close for
the same picture resized or re-encoded). :func:`near_groups` then finds near-duplicates among the
perceptual hashes without comparing every pair of images in Python.

Example
-------
>>> scan = scan_images(["data/digits/train/digit_0000.png"])  # doctest: +SKIP
>>> scan.loc[0, ["width", "height", "mode", "format"]].tolist()  # doctest: +SKIP
[8, 8, 'L', 'PNG']
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

COLUMNS = ["path", "bytes", "digest", "phash", "width", "height", "mode", "format", "problem"]
NEAR_DISTANCE = 6  # pHash bits that may differ for a near-duplicate: resized/re-encoded copies of a scene
# photo differed by <= 4 of 64 bits, distinct photos of the same set by >= 14
HASH_THUMBNAIL = 64  # JPEGs are decoded at a DCT scale that keeps at least this many pixels a side


def scan_file(path: str) -> dict:
    """Everything the report needs from one file, from a single read of its bytes."""
    record = dict.fromkeys(COLUMNS)
    record["path"] = path
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        record["problem"] = f"cannot be read ({exc.strerror or exc})"
        return record
    record["bytes"] = len(data)
    record["digest"] = hashlib.blake2b(data, digest_size=16).hexdigest()
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            record.update(width=im.size[0], height=im.size[1], mode=im.mode, format=im.format)
            if limit is not None and im.size[0] * im.size[1] > limit:
                record["problem"] = f"over the pixel limit ({im.size[0]}x{im.size[1]}; data.max_image_pixels)"
                return record
            if im.format == "JPEG":
                im.draft("L", (HASH_THUMBNAIL, HASH_THUMBNAIL))  # every byte still decoded, far faster
            im.load()  # a truncated or corrupt file fails here
            bits = imagehash.phash(im).hash.ravel()
        record["phash"] = int.from_bytes(np.packbits(bits).tobytes(), "big")
    except Image.DecompressionBombError:
        record["problem"] = "over the pixel limit (data.max_image_pixels)"
    except Exception as exc:  # Pillow raises many types for a file that is not a (whole) image
        record["problem"] = f"unreadable ({' '.join(str(exc).split())[:80] or type(exc).__name__})"
    return record


def scan_images(paths: list[str], workers: Optional[int] = None) -> pd.DataFrame:
    """:func:`scan_file` for every path, in threads (hashing and decoding release the GIL)."""
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        records = list(pool.map(scan_file, paths, chunksize=16))
    frame = pd.DataFrame(records, columns=COLUMNS)
    return frame.astype({"width": "Int64", "height": "Int64", "bytes": "Int64"})


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _POPCOUNT[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1)


def near_pairs(hashes: np.ndarray, max_distance: int = NEAR_DISTANCE, block: int = 512) -> np.ndarray:
    """``(k, 2)`` index pairs ``i < j`` of 64-bit hashes at most ``max_distance`` bits apart, in blocks
    of rows against the rest (memory ``block x n``).

    >>> near_pairs(np.array([0b0000, 0b0011, 0b1111_1111], dtype=np.uint64), max_distance=2).tolist()
    [[0, 1]]
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    found = []
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block]
        dist = _popcount(rows[:, None] ^ hashes[None, start:])
        i, j = np.nonzero(dist <= max_distance)
        keep = j > i  # the block's own columns start at `start`: j is relative to it, as is i
        found.append(np.column_stack([i[keep] + start, j[keep] + start]))
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)


def near_groups(phashes: pd.Series, max_distance: int = NEAR_DISTANCE) -> pd.Series:
    """A group number per row: rows whose perceptual hashes are within ``max_distance`` bits of
    each other (transitively) share it; rows without a hash get -1. Equal hashes are compared once."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    valid = phashes.notna()
    out = pd.Series(-1, index=phashes.index, dtype=np.int64)
    if not valid.any():
        return out
    unique, inverse = np.unique(phashes[valid].astype(np.uint64).to_numpy(), return_inverse=True)
    pairs = near_pairs(unique, max_distance)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(unique), len(unique)))
    _, component = connected_components(graph, directed=False)
    out[valid] = component[inverse]
    return out
