"""augment.resize: how a non-square image becomes the model's square input."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.cache import ImageCache
from pipeline.domain.transforms import eval_transform


def _wide() -> np.ndarray:
    """100 x 200: a white left quarter, a grey middle half, a black right quarter."""
    img = np.full((100, 200, 3), 128, np.uint8)
    img[:, :50] = 255
    img[:, 150:] = 0
    return img


def test_crop_keeps_the_centre_squash_keeps_everything_pad_adds_borders():
    crop = eval_transform(32, "bilinear", "crop")(image=_wide())["image"].numpy()
    squash = eval_transform(32, "bilinear", "squash")(image=_wide())["image"].numpy()
    pad = eval_transform(32, "bilinear", "pad")(image=_wide())["image"].numpy()
    assert crop.shape == squash.shape == pad.shape == (3, 32, 32)
    assert np.all(crop == 128)  # only the grey middle survives the centre crop
    assert squash[:, :, 0].min() == 255 and squash[:, :, -1].max() == 0  # both edges kept
    assert pad[:, 0].max() == 0 and pad[:, -1].max() == 0 and pad[:, 16, 0].min() == 255  # black rows above/below


def test_square_images_are_the_same_under_every_policy():
    square = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    outs = [eval_transform(32, "bicubic", p)(image=square)["image"].numpy() for p in ("crop", "squash", "pad")]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_the_image_cache_uses_the_policy(tmp_path):
    import cv2
    path = str(tmp_path / "wide.png")
    cv2.imwrite(path, _wide())
    cached = ImageCache([path], 32, "bilinear", resize="crop")[0]
    assert np.all(cached == 128)


def test_an_unknown_policy_is_a_config_error(make_config):
    with pytest.raises(PipelineError, match="augment.resize"):
        make_config("augment.resize=stretch")
