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


def test_the_zoom_view_crops_the_centre_and_keeps_the_size():
    """``zoom`` (a TTA and probe view): the central 80% of each side, resized back to the batch's size."""
    import torch

    from pipeline.domain.transforms import TTA_VIEWS

    x = torch.zeros(2, 3, 40, 40)
    x[..., 4:36, 4:36] = 1.0  # a black frame 4 px wide (10% of each side) around a white square
    zoomed = TTA_VIEWS["zoom"](x)
    assert zoomed.shape == x.shape
    assert torch.allclose(zoomed, torch.ones_like(x))  # the frame is cropped away: all white
    ramp = torch.linspace(0, 1, 50).expand(1, 1, 50, 50)  # left to right
    out = TTA_VIEWS["zoom"](ramp)
    assert out[..., 0].min() > 0.05 and out[..., -1].max() < 0.95  # the edges come from inside
    assert torch.allclose(out[..., 25], ramp[..., 25], atol=0.02)  # the centre column stays


def test_zoom_is_a_valid_tta_and_probe_view(make_config):
    cfg = make_config("augment.tta=[identity,zoom]", "train.probe_views=[identity,zoom]")
    assert cfg.augment.tta == ["identity", "zoom"] and cfg.train.probe_views == ["identity", "zoom"]
