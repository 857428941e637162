import json
import math

import pytest
import torch
import torch.nn.functional as F

from panoviz_callback.projection import erp_to_perspective
from panoviz_callback.views import STRATEGIES, Camera, ViewSet, make_views


def _cyclic(n, offset=0):
    return [(offset + k, offset + (k + 1) % n) for k in range(n)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b.to(a.dtype)).abs().max().item()


def test_smoke(device, textured_panorama):
    pano = textured_panorama(64).float().to(device)
    for strategy in STRATEGIES:
        vs = make_views(pano, strategy, image_size=32)
        assert isinstance(vs, ViewSet) and vs.strategy == strategy and vs.image_size == 32
        assert vs.pixels.shape == (len(vs), 3, 32, 32) and vs.pixels.dtype == torch.float32
        assert vs.pixels.device.type == device.type
        assert 0 <= vs.pixels.min() and vs.pixels.max() <= 1
        json.dumps(vs.options)


def test_e2p_default(textured_panorama):
    pano = textured_panorama(64).float()
    vs = make_views(pano, "e2p", image_size=48)
    assert len(vs) == 8 == math.ceil(360 / (90 * (1 - 0.5)))
    assert [c.yaw_deg for c in vs.cameras] == [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0]
    assert {(c.pitch_deg, c.fov_deg, c.kind, c.vfov_deg) for c in vs.cameras} == {(0.0, 90.0, "tile", None)}
    assert vs.pairs == _cyclic(8)
    assert vs.options == {"fov_deg": 90.0, "overlap": 0.5, "num_views": 8, "patch_size": 16}
    ref = erp_to_perspective(pano, [c.yaw_deg for c in vs.cameras], 0.0, 90.0, (48, 48))
    assert _max_diff(vs.pixels, ref) < 1e-6


@pytest.mark.parametrize(
    ("options", "yaws", "pairs"),
    [
        ({"num_views": 1}, [0.0], []),
        ({"num_views": 2}, [0.0, 180.0], [(0, 1)]),
        ({"fov_deg": 120, "overlap": 0.25}, [0.0, 90.0, 180.0, 270.0], _cyclic(4)),  # ceil(360 / 90)
        ({"fov_deg": 60, "overlap": 0.0}, [0.0, 60.0, 120.0, 180.0, 240.0, 300.0], _cyclic(6)),
        ({"fov_deg": 100, "overlap": 0.5}, [k * 360 / 8 for k in range(8)], _cyclic(8)),  # ceil(7.2)
    ],
)
def test_e2p_options(textured_panorama, options, yaws, pairs):
    vs = make_views(textured_panorama(32).float(), "e2p", image_size=16, **options)
    assert [c.yaw_deg for c in vs.cameras] == pytest.approx(yaws)
    assert vs.pairs == pairs
    assert vs.options["num_views"] == len(yaws)


def test_anyres_e2p_default(textured_panorama):
    pano = textured_panorama(64).float()  # (3, 64, 128)
    vs = make_views(pano, "anyres_e2p", image_size=32)
    assert len(vs) == 9
    assert vs.cameras[0] == Camera(0.0, 0.0, 360.0, "global", 180.0)
    assert [c.yaw_deg for c in vs.cameras[1:]] == [k * 45.0 for k in range(8)]
    assert all(c.kind == "tile" and c.pitch_deg == 0.0 for c in vs.cameras[1:])
    assert vs.pairs == _cyclic(8, offset=1)
    assert all(0 not in pair for pair in vs.pairs)
    # global view: the whole ERP resized to 32 x 16, letterboxed with black bars of 8 rows
    ref = F.interpolate(pano[None], size=(16, 32), mode="bilinear", antialias=True, align_corners=False)[0]
    assert _max_diff(vs.pixels[0, :, 8:24], ref) < 1e-6
    assert vs.pixels[0, :, :8].abs().max() == 0 and vs.pixels[0, :, 24:].abs().max() == 0
    assert _max_diff(vs.pixels[1:], make_views(pano, "e2p", image_size=32).pixels) == 0


def test_anyres_e2p_pitch_rows(textured_panorama):
    vs = make_views(textured_panorama(32).float(), "anyres_e2p", image_size=16, pitches=(-45, 0, 45), fov_deg=90)
    assert len(vs) == 1 + 3 * 8
    assert [c.pitch_deg for c in vs.cameras[1:]] == [-45.0] * 8 + [0.0] * 8 + [45.0] * 8
    assert [c.yaw_deg for c in vs.cameras[1:]] == [k * 45.0 for k in range(8)] * 3
    horizontal = _cyclic(8, 1) + _cyclic(8, 9) + _cyclic(8, 17)
    vertical = [(1 + k, 9 + k) for k in range(8)] + [(9 + k, 17 + k) for k in range(8)]
    assert vs.pairs == horizontal + vertical
    assert vs.options["pitches"] == [-45.0, 0.0, 45.0]


@pytest.mark.parametrize("faces", [4, 6])
def test_cubemap(textured_panorama, faces):
    pano = textured_panorama(64).float()
    vs = make_views(pano, "cubemap", image_size=32, faces=faces)
    yp = [(c.yaw_deg, c.pitch_deg) for c in vs.cameras]
    assert yp == [(0.0, 0.0), (90.0, 0.0), (180.0, 0.0), (270.0, 0.0), (0.0, 90.0), (0.0, -90.0)][:faces]
    assert all(c.kind == "face" and c.fov_deg == 90.0 for c in vs.cameras)
    expected = _cyclic(4) + ([(k, 4) for k in range(4)] + [(k, 5) for k in range(4)] if faces == 6 else [])
    assert vs.pairs == expected
    assert vs.options == {"faces": faces, "patch_size": 16}
    ref = erp_to_perspective(pano, [y for y, _ in yp], [p for _, p in yp], 90.0, (32, 32))
    assert _max_diff(vs.pixels, ref) < 1e-6


def test_sliding_window(textured_panorama):
    pano = textured_panorama(128).float()  # (3, 128, 256): windows 64 px wide, stride 32 px
    vs = make_views(pano, "sliding_window", image_size=32)
    assert len(vs) == 8
    assert [c.yaw_deg for c in vs.cameras] == [k * 45.0 for k in range(8)]
    assert {(c.pitch_deg, c.fov_deg, c.kind, c.vfov_deg) for c in vs.cameras} == {(0.0, 90.0, "window", None)}
    assert vs.pairs == _cyclic(8)
    for k in range(8):
        # window k is centred at column 128 + 32 k: roll it to the centre, cut the square equator band
        crop = torch.roll(pano, -32 * k, dims=-1)[:, 32:96, 96:160]
        ref = F.interpolate(crop[None], size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0]
        assert _max_diff(vs.pixels[k], ref) < 1e-6, k


def test_sliding_window_snaps_to_pixels(textured_panorama):
    pano = textured_panorama(50).float()[:, :, :97]  # W = 97 columns: neither W/4 nor W/8 is whole
    vs = make_views(pano, "sliding_window", image_size=16, num_views=5)
    for k, cam in enumerate(vs.cameras):
        width_px = cam.fov_deg * 97 / 360
        assert width_px == pytest.approx(round(width_px), abs=1e-9)  # a whole number of columns
        assert abs(cam.yaw_deg - k * 72.0) <= 0.5 * 360 / 97 + 1e-9  # within half a column of the nominal yaw
        assert cam.vfov_deg == pytest.approx(24 * 180 / 50)  # band height = width (24 px)


def test_e2p_yaws_and_central_crop(textured_panorama):
    pano = textured_panorama(64).float()
    yaws = [0.0, 90.0, 180.0, -90.0]
    vs = make_views(pano, "e2p", image_size=40, yaws=yaws, central_crop_ratio=0.9)
    assert [c.yaw_deg for c in vs.cameras] == yaws and vs.options["num_views"] == 4
    assert vs.pairs == _cyclic(4)
    # int(40 * (1 - 0.9) / 2) = 1 row off each side (1 - 0.9 < 0.1 in floating point), 38 rows stretched to 40
    assert [c.vfov_deg for c in vs.cameras] == pytest.approx([math.degrees(2 * math.atan(38 / 40))] * 4)
    render = erp_to_perspective(pano, yaws, 0.0, 90.0, (40, 40))[:, :, 1:39]
    ref = F.interpolate(render, size=(40, 40), mode="bilinear", antialias=True, align_corners=False)
    assert _max_diff(vs.pixels, ref) < 1e-6
    # out-of-order yaws pair up by angle
    vs = make_views(pano, "e2p", image_size=16, yaws=[0, 180, 90, 270])
    assert sorted(vs.pairs) == [(0, 2), (1, 3), (2, 1), (3, 0)]
    assert make_views(pano, "e2p", 16, central_crop_ratio=1.0).cameras[0].vfov_deg is None  # nothing cut


def test_anyres_e2p_render_sizes(textured_panorama):
    pano = textured_panorama(64).float()  # (3, 64, 128)
    vs = make_views(pano, "anyres_e2p", image_size=32, tile_render_size=96, global_render_size=48)
    fov = math.degrees(2 * math.atan(96 * 31 / (32 * 95)))  # align_corners=False resize of the render
    assert all(c.fov_deg == pytest.approx(fov) and c.vfov_deg is None for c in vs.cameras[1:])
    tiles = erp_to_perspective(pano, [c.yaw_deg for c in vs.cameras[1:]], 0.0, 90.0, (96, 96))
    ref = F.interpolate(tiles, size=(32, 32), mode="bilinear", align_corners=False)
    assert _max_diff(vs.pixels[1:], ref) < 1e-6
    # global: 48 x 24 letterboxed at rows 12..35 of 48, then 32 px: rows 8..23 hold the ERP
    assert vs.pixels[0, :, :7].abs().max() == 0 and vs.pixels[0, :, 25:].abs().max() == 0
    assert vs.pixels[0, :, 9:23].min() > 0


def test_sliding_window_column0_and_band(textured_panorama):
    pano = textured_panorama(120).float()  # (3, 120, 240): windows 60 px wide, stride 30 px
    vs = make_views(pano, "sliding_window", image_size=24, origin="column0", polar_margin=12, square_tolerance=None)
    assert [c.yaw_deg for c in vs.cameras] == pytest.approx([-135.0 + 45.0 * k for k in range(8)])
    assert {(c.fov_deg, c.vfov_deg, c.pitch_deg) for c in vs.cameras} == {(90.0, 150.0, 0.0)}
    for k in range(8):  # columns 30 k .. 30 k + 59 (wrapping), rows 10 .. 109
        crop = torch.roll(pano, -30 * k, dims=-1)[:, 10:110, :60]
        ref = F.interpolate(crop[None], size=(24, 24), mode="bilinear", antialias=True, align_corners=False)[0]
        assert _max_diff(vs.pixels[k], ref) < 1e-6, k
    # with a tolerance the band is cut to a centred square unless it is nearly square already
    square = make_views(pano, "sliding_window", 24, origin="column0", polar_margin=12, square_tolerance=0.1)
    assert {(c.fov_deg, c.vfov_deg) for c in square.cameras} == {(90.0, None)}
    wide = make_views(pano, "sliding_window", 24, fov_deg=170, polar_margin=12, square_tolerance=0.1)
    assert {(round(c.fov_deg, 6), c.vfov_deg) for c in wide.cameras} == {(150.0, None)}  # 113 -> 100 columns
    lanczos = make_views(pano, "sliding_window", 24, resample="lanczos", quantize=True)
    assert torch.equal((lanczos.pixels * 255).round(), lanczos.pixels * 255)  # 8-bit levels
    assert _max_diff(lanczos.pixels, make_views(pano, "sliding_window", 24).pixels) < 0.1


def test_viewset_to_and_len(device, textured_panorama):
    vs = make_views(textured_panorama(32).float(), "cubemap", image_size=16)
    moved = vs.to(device)
    assert len(moved) == 4 and moved.pixels.device.type == device.type
    assert moved.cameras == vs.cameras and moved.pairs == vs.pairs and vs.pixels.device.type == "cpu"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_channels_last_panorama(textured_panorama, strategy):
    """A panorama in (H, W, C) memory (as from numpy/PIL) gives the same, contiguous views."""
    pano = textured_panorama(32).float()
    hwc = pano.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    vs = make_views(hwc, strategy, image_size=16)
    assert vs.pixels.is_contiguous()
    assert _max_diff(vs.pixels, make_views(pano, strategy, image_size=16).pixels) < 5e-5


def test_uint8_panorama(textured_panorama):
    pano = textured_panorama(32).float()
    as_bytes = (pano * 255).round().to(torch.uint8)
    diff = _max_diff(make_views(as_bytes, "e2p", 16).pixels, make_views(pano, "e2p", 16).pixels)
    assert diff < 1 / 255


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"strategy": "ring"}, ValueError,
         r"Argument `strategy` must be one of \('e2p', 'anyres_e2p', 'cubemap', 'sliding_window'\), got 'ring'"),
        ({"fov_deg": 0}, ValueError, r"Argument `fov_deg` must be in \(0, 180\), got 0.0"),
        ({"fov_deg": 180}, ValueError, r"Argument `fov_deg` must be in \(0, 180\), got 180.0"),
        ({"strategy": "sliding_window", "fov_deg": -5}, ValueError, r"Argument `fov_deg` must be in \(0, 180\)"),
        ({"overlap": 1.0}, ValueError, r"Argument `overlap` must be in \[0, 1\), got 1.0"),
        ({"overlap": -0.1}, ValueError, r"Argument `overlap` must be in \[0, 1\), got -0.1"),
        ({"image_size": 8}, ValueError, r"Argument `image_size` must be in \[16, inf\], got 8"),
        ({"image_size": 10, "patch_size": 14}, ValueError, r"Argument `image_size` must be in \[14, inf\], got 10"),
        ({"num_views": 0}, ValueError, r"Argument `num_views` must be in \[1, inf\], got 0"),
        ({"num_views": 2.5}, ValueError, r"Argument `num_views` must be a whole number"),
        ({"fov": 90}, ValueError, r"Unknown option 'fov' for strategy 'e2p'; expected one of \('fov_deg', "),
        ({"strategy": "cubemap", "faces": 5}, ValueError, r"Argument `faces` must be one of \(4, 6\), got 5"),
        ({"strategy": "cubemap", "fov_deg": 90}, ValueError, r"Unknown option 'fov_deg' for strategy 'cubemap'"),
        ({"strategy": "anyres_e2p", "pitches": (0, 100)}, ValueError,
         r"Argument `pitches` must be in \[-90, 90\], got 100.0"),
        ({"strategy": "anyres_e2p", "pitches": ()}, ValueError, r"Argument `pitches` must hold at least one pitch"),
        ({"yaws": []}, ValueError, r"Argument `yaws` must hold at least one yaw"),
        ({"yaws": [0, 90], "num_views": 3}, ValueError, r"`num_views` \(3\) and `yaws` \(2 angles\) disagree"),
        ({"central_crop_ratio": 0}, ValueError, r"Argument `central_crop_ratio` must be in \(0, 1\]"),
        ({"resample": "nearest"}, ValueError, r"`resample` must be one of \('bilinear', 'bicubic', 'lanczos'\)"),
        ({"quantize": 1}, ValueError, r"Argument `quantize` must be True or False"),
        ({"strategy": "anyres_e2p", "tile_render_size": 1}, ValueError, r"Argument `tile_render_size` must be in \[2"),
        ({"strategy": "anyres_e2p", "global_render_size": 2.5}, ValueError, r"`global_render_size` must be a whole"),
        ({"strategy": "sliding_window", "origin": "left"}, ValueError, r"Argument `origin` must be one of"),
        ({"strategy": "sliding_window", "polar_margin": 2}, ValueError, r"Argument `polar_margin` must be in \[3"),
        ({"strategy": "sliding_window", "square_tolerance": -1}, ValueError, r"Argument `square_tolerance` must be"),
        ({"strategy": "cubemap", "central_crop_ratio": 0.9}, ValueError, r"Unknown option 'central_crop_ratio'"),
    ],
)
def test_exception(kwargs, error, match):
    kwargs = {"strategy": "e2p", **kwargs}
    with pytest.raises(error, match=match):
        make_views(torch.rand(3, 16, 32), **kwargs)


def test_exception_panorama():
    with pytest.raises(ValueError, match=r"Expected `pano` of shape \(3, H, W\), got \(4, 16, 32\)"):
        make_views(torch.rand(4, 16, 32))
    with pytest.raises(TypeError, match="Expected `pano` to be a torch.Tensor, got list"):
        make_views([[0.0]])
    with pytest.raises(ValueError, match="Argument `kind` must be one of"):
        Camera(0.0, 0.0, 90.0, "fisheye")
