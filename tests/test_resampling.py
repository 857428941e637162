import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from panoviz_callback.resampling import FILTERS, quantize_8bit, resize_images

_PIL = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def _u8(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _ours_u8(arr: np.ndarray, out_hw, name: str) -> np.ndarray:
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    out = resize_images(x, out_hw, name, quantize=True)[0].permute(1, 2, 0)
    return (out.double() * 255).round().numpy().astype(np.uint8)


@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize(
    ("in_hw", "out_hw"),
    [
        ((202, 224), (224, 224)),  # PanoLLaVA's e2p stretch: one axis, up
        ((854, 50), (224, 50)),  # one axis, down by 3.8 (support scaled)
        ((50, 700), (50, 224)),
        ((256, 512), (84, 168)),  # PanoLLaVA's global letterbox: both axes, down
        ((128, 128), (56, 56)),
        ((37, 50), (80, 20)),  # up and down at once
    ],
)
def test_equals_pillow_on_uint8(name, in_hw, out_hw):
    arr = _u8(*in_hw)
    ref = np.asarray(Image.fromarray(arr).resize(out_hw[::-1], _PIL[name]))
    assert np.array_equal(_ours_u8(arr, out_hw, name), ref)


@pytest.mark.parametrize("name", ["bilinear", "bicubic"])
def test_float_path_equals_torch_antialias(name):
    """Float weights against torch's antialiased interpolation (the same separable filters)."""
    x = torch.rand(2, 3, 60, 90, dtype=torch.float64)
    for out_hw in [(20, 30), (25, 90), (60, 41)]:
        ref = F.interpolate(x, size=out_hw, mode=name, antialias=True, align_corners=False)
        assert (resize_images(x, out_hw, name) - ref).abs().max() < 1e-6


def test_smoke_and_cardinality():
    x = torch.rand(4, 2, 9, 13, dtype=torch.float32)
    out = resize_images(x, (5, 7))
    assert out.shape == (4, 2, 5, 7) and out.dtype == torch.float32
    assert torch.equal(resize_images(x, (9, 13)), x)  # no axis changes: nothing filtered
    q = resize_images(x, (9, 13), quantize=True)
    assert torch.equal(q, quantize_8bit(x)) and torch.equal((q * 255).round(), q * 255)
    flat = torch.full((1, 3, 10, 10), 0.3)
    assert (resize_images(flat, (4, 17), "lanczos") - 0.3).abs().max() < 1e-6  # weights sum to one


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.rand(3, 8, 8), (4, 4)), ValueError, r"Expected `images` of shape \(N, C, h, w\)"),
        ((torch.rand(1, 3, 8, 8), (0, 4)), ValueError, r"Argument `out_hw` must be"),
        ((torch.rand(1, 3, 8, 8), (4, 4), "nearest"), ValueError, r"Argument `filter` must be one of"),
    ],
)
def test_exception(args, error, match):
    with pytest.raises(error, match=match):
        resize_images(*args)
