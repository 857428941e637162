import math

import numpy as np
import pytest
import torch
from conftest import SHARED_PANORAMAS

from panoviz_callback.projection import (
    _perspective_sampler,
    _perspective_taps,
    camera_rotation,
    direction_to_lonlat,
    direction_to_pixel,
    erp_to_perspective,
    lonlat_to_direction,
    pixel_to_direction,
    sample_views,
)
from panoviz_callback.views import Camera

py360convert = pytest.importorskip("py360convert")


def _e2p_reference(pano: torch.Tensor, fov, yaw, pitch, hw) -> torch.Tensor:
    arr = pano.permute(1, 2, 0).numpy()
    out = py360convert.e2p(arr, fov, yaw, pitch, hw, mode="bilinear")  # (h, w, C)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    """Like ``torch.testing.assert_close(rtol=0)`` without its slow first import."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual - expected.to(actual.dtype)).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol:g}"


def _coordinate_panorama(height: int = 128) -> torch.Tensor:
    """(3, H, 2H) float64: channel 0 holds the column, channel 1 the row of each pixel."""
    width = 2 * height
    xs = torch.arange(width, dtype=torch.float64).expand(height, width)
    ys = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
    return torch.stack([xs, ys, torch.zeros_like(xs)])


def _channels_last(pano: torch.Tensor) -> torch.Tensor:
    """The same values in (..., H, W, C) memory, as from numpy/PIL, viewed as (..., C, H, W)."""
    return pano.movedim(-3, -1).contiguous().movedim(-1, -3)


def test_smoke(device, textured_panorama):
    pano = textured_panorama(64).float().to(device)
    out = erp_to_perspective(pano, 30.0, -10.0, 90.0, (24, 32))
    assert out.shape == (3, 24, 32) and out.device.type == device.type
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    gathered = erp_to_perspective(_channels_last(pano), [30.0, 180.0], [-10.0, 85.0], 90.0, (24, 32))  # taps path
    assert gathered.shape == (2, 3, 24, 32) and gathered.device.type == device.type and gathered.is_contiguous()
    _assert_close(gathered, erp_to_perspective(pano, [30.0, 180.0], [-10.0, 85.0], 90.0, (24, 32)), atol=5e-5)


def test_cardinality(textured_panorama):
    pano = textured_panorama(32).float()
    assert erp_to_perspective(pano, [0, 90, 180], 0, 90, (16, 16)).shape == (3, 3, 16, 16)
    assert erp_to_perspective(pano, 0, torch.tensor([-45.0, 45.0]), 90, (16, 8)).shape == (2, 3, 16, 8)
    batch = torch.stack([pano, 1 - pano])  # (B, C, H, W)
    assert erp_to_perspective(batch, 10, 0, 90, (16, 16)).shape == (2, 3, 16, 16)
    views = erp_to_perspective(batch, [0, 120, 240], [0, 10, 20], (100, 60), (12, 16))
    assert views.shape == (2, 3, 3, 12, 16)
    # every panorama of the batch gives the same views as on its own
    _assert_close(views[1], erp_to_perspective(1 - pano, [0, 120, 240], [0, 10, 20], (100, 60), (12, 16)))


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 5e-5)])
def test_memory_layout(textured_panorama, dtype, atol):
    """A panorama backed by (H, W, C) memory (sampled by the cached-taps gather) gives the same
    views as a planar one (grid_sample), seams and poles included; float32 differs only by
    grid_sample's float32 coordinates."""
    pano = textured_panorama(32).to(dtype)
    hwc = _channels_last(pano)
    yaws, pitches = [180.0, 0.0, -179.0, 45.0], [0.0, 89.0, -80.0, -90.0]
    expected = erp_to_perspective(pano, yaws, pitches, 90, (16, 16))
    actual = erp_to_perspective(hwc, yaws, pitches, 90, (16, 16))
    assert actual.is_contiguous() and actual.dtype == dtype
    _assert_close(actual, expected, atol=atol)
    batch = torch.stack([pano, 1 - pano])  # (B, C, H, W)
    _assert_close(erp_to_perspective(_channels_last(batch), yaws, pitches, 90, (16, 16)),
                  erp_to_perspective(batch, yaws, pitches, 90, (16, 16)), atol=atol)
    nearest = erp_to_perspective(hwc, yaws, pitches, 90, (16, 16), mode="nearest")
    _assert_close(nearest, erp_to_perspective(pano, yaws, pitches, 90, (16, 16), mode="nearest"), atol=0)


@pytest.mark.parametrize(
    ("yaw", "pitch", "fov", "hw"),
    [
        (0, 0, 90, (32, 32)),
        (30, 20, 90, (33, 31)),
        (180, 0, 90, (40, 40)),  # across the seam
        (-170, -10, (100, 60), (30, 50)),  # (h_fov, v_fov)
        (10, 90, 90, (32, 32)),  # over the north pole
        (45, -90, 120, (32, 32)),  # south pole
        (179.9, 85, 150, (64, 64)),  # seam and pole together
    ],
)
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_agreement_with_py360convert(textured_panorama, yaw, pitch, fov, hw, layout):
    pano = textured_panorama(128, seed=3, max_freq=12.0)
    pano = pano if layout == "CHW" else _channels_last(pano)
    ref = _e2p_reference(pano, fov, yaw, pitch, hw)
    ours = erp_to_perspective(pano, yaw, pitch, fov, hw)
    diff = (ours - ref).abs()[:, 1:-1, 1:-1]
    assert diff.mean() < 0.01  # the bound
    assert diff.max() < 1e-4  # in fact the same samples up to py360convert's float32 coordinates


@pytest.mark.skipif(not any(SHARED_PANORAMAS.glob("*.jpg")), reason="no shared panoramas next to the repository")
def test_agreement_with_py360convert_on_photographs():
    from PIL import Image

    for path in sorted(SHARED_PANORAMAS.glob("*.jpg")):
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB").resize((1024, 512)), dtype=np.float32) / 255
        pano = torch.from_numpy(arr).permute(2, 0, 1)  # (C, H, W) view of (H, W, C) memory
        yaws, pitches = [0.0, 135.0, 180.0, -100.0], [0.0, 30.0, -60.0, 80.0]
        for layout in (pano, pano.contiguous()):
            ours = erp_to_perspective(layout, yaws, pitches, 90.0, (96, 96))
            for k, (yaw, pitch) in enumerate(zip(yaws, pitches)):
                ref = _e2p_reference(pano, 90.0, yaw, pitch, (96, 96))
                diff = (ours[k] - ref).abs()[:, 2:-2, 2:-2]
                assert diff.mean() < 0.01, (path.name, yaw, pitch, float(diff.mean()))
                assert diff.max() < 2e-4, (path.name, yaw, pitch, float(diff.max()))


def test_convention_coordinates():
    """A panorama whose pixels hold their own (column, row): a view's pixel tells where it sampled."""
    height, width = 128, 256
    pano = _coordinate_panorama(height)

    def erp_xy(lon, lat):
        return (lon / 360 + 0.5) * width - 0.5, (0.5 - lat / 180) * height - 0.5

    view = erp_to_perspective(pano, 30.0, 20.0, 90.0, (33, 33))
    x, y = erp_xy(30.0, 20.0)  # the centre pixel looks at (yaw, pitch)
    assert view[0, 16, 16].item() == pytest.approx(x, abs=1e-6)
    assert view[1, 16, 16].item() == pytest.approx(y, abs=1e-6)
    view = erp_to_perspective(pano, 0.0, 0.0, 90.0, (33, 33))
    # edge pixel centres at +-fov/2: left column looks at lon -45, top row at lat +45
    assert view[0, 16, 0].item() == pytest.approx(erp_xy(-45.0, 0.0)[0], abs=1e-6)
    assert view[0, 16, 32].item() == pytest.approx(erp_xy(45.0, 0.0)[0], abs=1e-6)
    assert view[1, 0, 16].item() == pytest.approx(erp_xy(0.0, 45.0)[1], abs=1e-6)
    assert view[1, 32, 16].item() == pytest.approx(erp_xy(0.0, -45.0)[1], abs=1e-6)
    # off-axis pixel: the ray (tan 45 * 0.5, tan 45 * 0.5, 1) of a 90 deg view at yaw 0
    lon, lat = math.degrees(math.atan2(0.5, 1)), math.degrees(math.atan2(0.5, math.hypot(0.5, 1)))
    assert view[0, 8, 24].item() == pytest.approx(erp_xy(lon, lat)[0], abs=1e-6)
    assert view[1, 8, 24].item() == pytest.approx(erp_xy(lon, lat)[1], abs=1e-6)


def test_convention_yaw_direction():
    """Asymmetric panorama: a bright blob at lon +60 (right), lat +30 (up)."""
    height = 128
    lat = (0.5 - (torch.arange(height) + 0.5) / height) * 180
    lon = ((torch.arange(2 * height) + 0.5) / (2 * height) - 0.5) * 360
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")
    dirs = lonlat_to_direction(lon, lat)  # (H, W, 3)
    blob_dir = lonlat_to_direction(torch.tensor(60.0), torch.tensor(30.0))
    blob = ((dirs @ blob_dir) > math.cos(math.radians(10))).double()
    pano = torch.stack([blob, torch.zeros_like(blob), 1 - blob])
    assert erp_to_perspective(pano, 60.0, 30.0, 60.0, (17, 17))[0, 8, 8] == 1
    assert erp_to_perspective(pano, -60.0, 30.0, 60.0, (17, 17))[0].max() == 0
    assert erp_to_perspective(pano, 60.0, -30.0, 60.0, (17, 17))[0].max() == 0
    front = erp_to_perspective(pano, 0.0, 0.0, 160.0, (101, 101))[0]
    ys, xs = torch.nonzero(front > 0.5, as_tuple=True)
    assert xs.double().mean() > 60 and ys.double().mean() < 40  # right of and above the centre (50, 50)
    ref = _e2p_reference(pano, 160.0, 0.0, 0.0, (101, 101))[0]
    assert (front - ref).abs().max() < 1e-4


def test_seamless_at_seam_and_poles(textured_panorama):
    pano = textured_panorama(64, seed=1)
    rolled = torch.roll(pano, shifts=64, dims=-1)  # longitude 180 moves to the centre
    _assert_close(erp_to_perspective(pano, 180.0, 10.0, 90.0, (32, 32)),
                               erp_to_perspective(rolled, 0.0, 10.0, 90.0, (32, 32)), atol=1e-6)
    # looking straight up, turning by 180 deg rotates the image by 180 deg in-plane
    up0 = erp_to_perspective(pano, 0.0, 90.0, 90.0, (32, 32))
    up180 = erp_to_perspective(pano, 180.0, 90.0, 90.0, (32, 32))
    _assert_close(up180, up0.flip(-1, -2), atol=1e-6)


def test_directions_over_the_pole(direction_panorama):
    pano = direction_panorama(128)
    view = erp_to_perspective(pano, 20.0, 75.0, 100.0, (41, 41))
    sampled = torch.nn.functional.normalize(view * 2 - 1, dim=0).permute(1, 2, 0)  # (h, w, 3)
    xs, ys = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="xy")
    expected, _ = pixel_to_direction(torch.stack([xs, ys], -1).double(), Camera(20.0, 75.0, 100.0, "tile"), 41)
    angle = torch.rad2deg(torch.acos((sampled * expected).sum(-1).clamp(-1, 1)))
    assert angle.max() < 180 / 128  # within one ERP pixel everywhere, the pole included


@pytest.mark.parametrize("kind", ["tile", "face", "window", "global"])
def test_back_and_forth(kind):
    cam = Camera(-123.0, 25.0, 75.0, kind, 50.0) if kind != "global" else Camera(0.0, 0.0, 360.0, "global", 180.0)
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=gen, dtype=torch.float64) * 63
    if kind == "global":  # the ERP fills rows 16..47 of the 64 x 64 letterbox
        xy[:, 1] = 16 + xy[:, 1] / 63 * 31
    dirs, valid = pixel_to_direction(xy, cam, 64)
    assert valid.all()
    _assert_close(dirs.norm(dim=-1), torch.ones(500, dtype=torch.float64))
    back, inside = direction_to_pixel(dirs, cam, 64)
    _assert_close(back, xy, atol=1e-9)
    assert inside[(xy > 0.5).all(-1) & (xy < 62.5).all(-1)].all()


def test_lonlat_and_rotation_conventions():
    lon, lat = torch.tensor([0.0, 90.0, -90.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 90.0])
    d = lonlat_to_direction(lon, lat)
    _assert_close(d, torch.tensor([[0.0, 0, 1], [1, 0, 0], [-1, 0, 0], [0, 1, 0]]), atol=1e-6)
    lon2, lat2 = direction_to_lonlat(d[:3])
    _assert_close(lon2, lon[:3])
    _assert_close(lat2, lat[:3], atol=1e-5)
    rot = camera_rotation(torch.tensor(90.0), torch.tensor(0.0))  # columns: right, up, forward
    _assert_close(rot[:, 2], torch.tensor([1.0, 0, 0]), atol=1e-6)
    rot = camera_rotation(torch.tensor(0.0), torch.tensor(30.0))
    assert rot[1, 2] > 0  # pitch up: forward has a positive y
    _assert_close(rot @ rot.T, torch.eye(3), atol=1e-6)


def test_window_and_global_views(textured_panorama):
    pano = textured_panorama(64).float()  # (3, 64, 128)
    cams = [
        Camera(180.0, 0.0, 90.0, "window"), Camera(0.0, 0.0, 360.0, "global", 180.0), Camera(0.0, 0.0, 90.0, "tile")
    ]
    out = sample_views(pano, cams, 16)
    crop = torch.roll(pano, 64, dims=-1)[:, 16:48, 48:80]  # 90 deg around lon 180, the equator band
    ref = torch.nn.functional.interpolate(crop[None], size=(16, 16), mode="bilinear", antialias=True)[0]
    _assert_close(out[0], ref)
    assert out[1, :, :4].abs().max() == 0 and out[1, :, 12:].abs().max() == 0  # letterbox bars
    assert out[1, :, 4:12].abs().min() > 0
    _assert_close(out[2], erp_to_perspective(pano, 0.0, 0.0, 90.0, (16, 16)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_grid_cache(textured_panorama, channels_last):
    pano = textured_panorama(32).float()
    pano, cache = (_channels_last(pano), _perspective_taps) if channels_last else (pano, _perspective_sampler)
    first = erp_to_perspective(pano, [1.0, 2.0], 3.0, 77.0, (8, 8))
    hits = cache.cache_info().hits
    second = erp_to_perspective(pano, [1.0, 2.0], 3.0, 77.0, (8, 8))
    assert cache.cache_info().hits == hits + 1
    _assert_close(first, second, atol=0)


class _BadCam:
    yaw_deg, pitch_deg, fov_deg, kind, vfov_deg = 0.0, 0.0, 90.0, "fisheye", None


def test_exception(textured_panorama):
    pano = textured_panorama(16).float()
    with pytest.raises(ValueError, match=r"Expected `pano` of shape \(C, H, W\) or \(B, C, H, W\), got \(32,\)"):
        erp_to_perspective(torch.zeros(32), 0, 0, 90, (8, 8))
    with pytest.raises(TypeError, match="floating point"):
        erp_to_perspective(torch.zeros(3, 8, 16, dtype=torch.uint8), 0, 0, 90, (8, 8))
    with pytest.raises(ValueError, match=r"Argument `fov_deg` must be in \(0, 180\), got 180.0"):
        erp_to_perspective(pano, 0, 0, 180, (8, 8))
    with pytest.raises(ValueError, match=r"Argument `fov_deg` must be in \(0, 180\), got 0.0"):
        erp_to_perspective(pano, 0, 0, (90, 0), (8, 8))
    with pytest.raises(ValueError, match="Argument `mode` must be one of"):
        erp_to_perspective(pano, 0, 0, 90, (8, 8), mode="bicubic")
    with pytest.raises(ValueError, match="same length"):
        erp_to_perspective(pano, [0, 1, 2], [0, 1], 90, (8, 8))
    with pytest.raises(ValueError, match="scalar or 1-D"):
        erp_to_perspective(pano, torch.zeros(2, 2), 0, 90, (8, 8))
    with pytest.raises(ValueError, match="Argument `kind` must be one of"):
        sample_views(pano, [_BadCam()], 8)
