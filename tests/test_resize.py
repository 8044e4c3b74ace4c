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


# ---------------------------------------------------------------------------- augment.crop_pct


def _rings(side: int) -> np.ndarray:
    """A square whose outer eighth of each side is black and the rest white."""
    img = np.zeros((side, side, 3), np.uint8)
    edge = side // 8
    img[edge:side - edge, edge:side - edge] = 255
    return img


@pytest.mark.parametrize("policy", ["crop", "squash"])
def test_crop_pct_frames_the_centre_as_timm_does(policy):
    """At crop_pct 0.875 a 256-px image is not rescaled: its central 224 px are the input (timm's
    eval transform at 224 px: scale to 256, centre crop 224)."""
    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = eval_transform(224, "bicubic", policy, crop_pct=0.875)(image=img)["image"].numpy()
    assert np.array_equal(out, img[16:240, 16:240].transpose(2, 0, 1))
    # a small image is enlarged to 256 first and 16 px go on each side: a 4-px black border of a
    # 32-px image is 28 px wide in the whole image, 32 - 16 in the framed one
    whole = eval_transform(224, "nearest", policy)(image=_rings(32))["image"].numpy()
    framed = eval_transform(224, "nearest", policy, crop_pct=0.875)(image=_rings(32))["image"].numpy()
    assert whole[:, 22, 112].max() == 0 and framed[:, 22, 112].min() == 255


def test_a_large_image_shrinks_without_aliasing():
    """Shrinking averages the pixels it drops (area), as Pillow's resize in timm's transform does:
    a one-pixel checkerboard becomes flat grey, not a pattern of its samples."""
    board = (np.indices((448, 448)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, 2)
    out = eval_transform(112, "bicubic", "crop", crop_pct=1.0)(image=board)["image"].numpy().astype(int)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 3


def test_crop_pct_null_is_the_backbones_pretrained_framing(make_config):
    import timm

    from pipeline.engine.backbones import data_config

    cfg = make_config()
    model = timm.create_model("test_efficientnet", pretrained=False)
    pretrained = timm.data.resolve_model_data_config(model)["crop_pct"]
    assert cfg.augment.crop_pct == 1.0 == data_config(model, cfg.backbones[0], cfg.augment.crop_pct)["crop_pct"]
    assert data_config(model, cfg.backbones[0], None)["crop_pct"] == pretrained < 1


@pytest.mark.parametrize("value", [0.3, 1.2, "half"])
def test_a_bad_crop_pct_is_a_config_error(make_config, value):
    with pytest.raises(PipelineError, match="augment.crop_pct"):
        make_config(f"augment.crop_pct={value}")
