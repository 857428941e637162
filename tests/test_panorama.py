"""Tests for panoviz_callback.panorama: loading files and the synthetic probe scene."""

from __future__ import annotations

import math
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from panoviz_callback.panorama import PanoramaError, load_panorama, synthetic_panorama
from panoviz_callback.synthetic import (
    _BACK,
    _CEILING,
    _FLOOR,
    _FLOOR_COLORS,
    _FRONT,
    _LEFT,
    _OBJECT,
    _RIGHT,
    _ROOM_HI,
    _ROOM_LO,
    _WALL_COLORS,
    _pixel_regions,
    _ray_grid,
    _render_scene,
    _scene_objects,
    _shade_object,
)

SHARED_PANORAMA = Path("/work/shared/panoramas/2094501355_045ede6d89_k.jpg")


# --------------------------------------------------------------------------- helpers


def _smooth_rgb(h: int, w: int) -> np.ndarray:
    """A smooth, asymmetric test image (h, w, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([xx / (w - 1), yy / (h - 1), 0.5 + 0.4 * np.sin(xx / w * 6.0) * np.cos(yy / h * 5.0)], -1)


def _write_png16(path: Path, a: np.ndarray) -> None:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB), cycling the None/Sub/Up row filters."""
    h, w, c = a.shape
    rows = a.astype(">u2").view(np.uint8).reshape(h, w * c * 2).astype(np.int16)
    bpp = 2 * c
    data = []
    for y in range(h):
        kind = y % 3
        if kind == 1:
            row = rows[y] - np.concatenate([np.zeros(bpp, np.int16), rows[y, :-bpp]])
        elif kind == 2:
            row = rows[y] - (rows[y - 1] if y else 0)
        else:
            row = rows[y]
        data.append(bytes([kind]) + (row % 256).astype(np.uint8).tobytes())
    _write_png_chunks(path, w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], zlib.compress(b"".join(data)))


def _write_png_chunks(path: Path, w: int, h: int, depth: int, color_type: int, idat: bytes) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _as_hwc(pano: torch.Tensor) -> np.ndarray:
    return pano.permute(1, 2, 0).numpy()


def _col(lon_deg: float, w: int) -> int:
    return int(round((lon_deg / 360.0 + 0.5) * w - 0.5)) % w


def _row(lat_deg: float, h: int) -> int:
    return int(round((0.5 - lat_deg / 180.0) * h - 0.5))


# --------------------------------------------------------------------------- load_panorama


class TestLoadPanorama:
    def test_smoke_jpeg(self, tmp_path):
        path = tmp_path / "pano.jpg"
        Image.fromarray(np.uint8(_smooth_rgb(32, 64) * 255)).save(path, quality=95)
        pano = load_panorama(path)
        assert pano.shape == (3, 32, 64) and pano.dtype == torch.float32 and pano.device.type == "cpu"
        expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        np.testing.assert_allclose(_as_hwc(pano), expected, atol=1e-6)
        assert load_panorama(str(path)).equal(pano)

    @pytest.mark.parametrize(
        "suffix, params",
        [(".png", {}), (".webp", {"lossless": True}), (".tiff", {}), (".tif", {"compression": "tiff_lzw"})],
    )
    def test_lossless_8bit_roundtrip(self, tmp_path, suffix, params):
        a = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
        path = tmp_path / f"pano{suffix}"
        Image.fromarray(a).save(path, **params)
        np.testing.assert_allclose(_as_hwc(load_panorama(path)), a / 255.0, atol=1e-6)

    @pytest.mark.parametrize("suffix", [".png", ".tiff"])
    def test_16bit_gray(self, tmp_path, suffix):
        k = np.arange(50, dtype=np.uint16).reshape(5, 10) * 5
        a = (k * 257).astype(np.uint16)
        a[0, :3] = (0, 1, 65535)
        path = tmp_path / f"gray16{suffix}"
        Image.fromarray(a).save(path)
        assert Image.open(path).mode.startswith("I;16")
        pano = load_panorama(path)
        assert pano.shape == (3, 5, 10)
        np.testing.assert_allclose(pano[0, 1:].numpy(), k[1:] / 255.0, atol=1e-6)  # 257 * k -> k / 255
        assert pano[0, 0, 0] == 0.0 and pano[0, 0, 2] == 1.0
        assert pano[0, 0, 1] == pytest.approx(1 / 65535, abs=1e-9)  # the low byte survives
        assert torch.equal(pano[0], pano[1]) and torch.equal(pano[0], pano[2])

    @pytest.mark.parametrize("channels", [3, 4])
    def test_16bit_rgb_png_keeps_precision(self, tmp_path, channels):
        a = np.random.default_rng(channels).integers(0, 65536, (12, 24, channels)).astype(np.uint16)
        a[0, 0, :3] = (65535, 257 * 7, 1)
        path = tmp_path / "rgb16.png"
        _write_png16(path, a)
        pano = load_panorama(path)
        np.testing.assert_allclose(_as_hwc(pano), a[..., :3] / 65535.0, atol=1e-7)  # alpha dropped
        assert pano[:, 0, 0].tolist() == pytest.approx([1.0, 7 / 255, 1 / 65535], abs=1e-9)

    def test_16bit_rgb_tiff_keeps_precision(self, tmp_path):
        tifffile = pytest.importorskip("tifffile")
        a = np.random.default_rng(1).integers(0, 65536, (10, 20, 3)).astype(np.uint16)
        for i, (byteorder, compression) in enumerate([("<", None), (">", None), ("<", "zlib")]):
            path = tmp_path / f"rgb16_{i}.tif"
            tifffile.imwrite(path, a, photometric="rgb", byteorder=byteorder, compression=compression)
            np.testing.assert_allclose(_as_hwc(load_panorama(path)), a / 65535.0, atol=1e-7)

    @pytest.mark.parametrize("mode", ["L", "LA", "1"])
    def test_grayscale_becomes_rgb(self, tmp_path, mode):
        gray = np.random.default_rng(2).integers(0, 256, (16, 32), dtype=np.uint8)
        im = Image.fromarray(gray)
        if mode == "LA":
            im = Image.merge("LA", (im, Image.new("L", im.size, 0)))
        elif mode == "1":
            im = im.convert("1")
            gray = np.asarray(im, dtype=np.uint8) * 255
        path = tmp_path / "gray.png"
        im.save(path)
        pano = load_panorama(path)
        assert pano.shape == (3, 16, 32)
        for c in range(3):
            np.testing.assert_allclose(pano[c].numpy(), gray / 255.0, atol=1e-6)

    def test_palette(self, tmp_path):
        colors = [(255, 0, 0), (0, 128, 255), (10, 200, 30)]
        im = Image.new("P", (12, 6))
        im.putpalette([v for c in colors for v in c] + [0] * (768 - 9))
        im.putdata([i % 3 for i in range(72)])
        path = tmp_path / "palette.png"
        im.save(path)
        pano = load_panorama(path)
        for i in range(6):
            assert pano[:, i // 12, i % 12].mul(255).round().tolist() == list(colors[i % 3])

    def test_rgba_alpha_dropped(self, tmp_path):
        rgb = np.random.default_rng(3).integers(0, 256, (8, 16, 3), dtype=np.uint8)
        alpha = np.zeros((8, 16, 1), np.uint8)  # fully transparent: the colour must survive unchanged
        alpha[:, 8:] = 128
        path = tmp_path / "rgba.png"
        Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(path)
        np.testing.assert_allclose(_as_hwc(load_panorama(path)), rgb / 255.0, atol=1e-6)

    @pytest.mark.parametrize("suffix", [".jpg", ".png"])
    def test_exif_orientation_ignored(self, tmp_path, suffix):
        a = np.zeros((20, 40, 3), np.uint8)
        a[:, 20:] = 255  # stored layout: dark left half, bright right half
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display"
        path = tmp_path / f"rotated{suffix}"
        Image.fromarray(a).save(path, exif=exif.tobytes())
        assert Image.open(path).getexif()[0x0112] == 6
        pano = load_panorama(path)
        assert pano.shape == (3, 20, 40)
        assert pano[:, :, :16].mean() < 0.05 and pano[:, :, 24:].mean() > 0.95

    @pytest.mark.parametrize("suffix", [".png", ".jpg"])
    def test_max_width_downscale(self, tmp_path, suffix):
        a = np.uint8(_smooth_rgb(256, 512) * 255)
        path = tmp_path / f"big{suffix}"
        Image.fromarray(a).save(path, quality=95)
        pano = load_panorama(path, max_width=128)
        assert pano.shape == (3, 64, 128)
        full = Image.open(path).convert("RGB")
        reference = np.asarray(full.resize((128, 64), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
        assert np.abs(_as_hwc(pano) - reference).mean() < 0.01
        assert np.abs(_as_hwc(pano) - reference).max() < 0.06
        odd = load_panorama(path, max_width=100)  # not a power-of-two factor: exact size, aspect kept
        assert odd.shape == (3, 50, 100)

    def test_max_width_never_upscales(self, tmp_path):
        path = tmp_path / "small.png"
        Image.fromarray(np.uint8(_smooth_rgb(16, 32) * 255)).save(path)
        assert load_panorama(path, max_width=32).equal(load_panorama(path))
        assert load_panorama(path, max_width=1000).shape == (3, 16, 32)

    def test_max_width_16bit(self, tmp_path):
        a = np.round(_smooth_rgb(90, 180) * 65535).astype(np.uint16)
        rgb_path, gray_path = tmp_path / "rgb16.png", tmp_path / "gray16.png"
        _write_png16(rgb_path, a)
        Image.fromarray(a[..., 0]).save(gray_path)
        reference = F.interpolate(
            torch.tensor(a / 65535.0, dtype=torch.float32).permute(2, 0, 1)[None], size=(20, 40), mode="bilinear",
            antialias=True,
        )[0]
        rgb = load_panorama(rgb_path, max_width=40)
        gray = load_panorama(gray_path, max_width=40)
        assert rgb.shape == gray.shape == (3, 20, 40)
        assert (rgb - reference).abs().mean() < 0.005
        assert (gray[0] - reference[0]).abs().mean() < 0.005

    def test_non_2to1_warns_and_loads(self, tmp_path):
        path = tmp_path / "wide.png"
        Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(path)
        with pytest.warns(UserWarning, match=r"panorama is 1\.50:1, expected 2:1") as record:
            pano = load_panorama(path)
        assert pano.shape == (3, 40, 60)
        assert str(path) in str(record[0].message)

    def test_2to1_does_not_warn(self, tmp_path):
        path = tmp_path / "ok.png"
        Image.fromarray(np.zeros((50, 101, 3), np.uint8)).save(path)  # one pixel off 2:1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_panorama(path)

    @pytest.mark.parametrize(
        "case, reason",
        [
            ("missing", "file not found"),
            ("directory", "it is a directory"),
            ("empty", r"the file is empty \(0 bytes\)"),
            ("text", "not a recognised image"),
            ("truncated_jpeg", "truncated or corrupt"),
            ("truncated_png", "truncated or corrupt"),
            ("corrupt_webp", "truncated or corrupt"),
            ("zero_width", r"zero size \(0x5\)"),
            ("zero_height", r"zero size \(7x0\)"),
            ("huge", "too large"),
        ],
    )
    def test_exception(self, tmp_path, case, reason):
        path = tmp_path / f"{case}.img"
        noise = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
        if case == "directory":
            path.mkdir()
        elif case == "empty":
            path.touch()
        elif case == "text":
            path.write_text("not an image\n")
        elif case.startswith(("truncated", "corrupt")):
            fmt = {"truncated_jpeg": "JPEG", "truncated_png": "PNG", "corrupt_webp": "WEBP"}[case]
            Image.fromarray(noise).save(path, format=fmt)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif case in ("zero_width", "zero_height", "huge"):
            w, h = {"zero_width": (0, 5), "zero_height": (7, 0), "huge": (100_000, 50_000)}[case]
            _write_png_chunks(path, w, h, 8, 2, zlib.compress(b""))
        with pytest.raises(PanoramaError, match=f"{re.escape(str(path))}.*{reason}"):
            load_panorama(path)

    def test_truncated_raises_even_if_pillow_allows_it(self, tmp_path, monkeypatch):
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        path = tmp_path / "cut.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:-400])
        with pytest.raises(PanoramaError, match="truncated"):
            load_panorama(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored

    def test_large_panorama_is_no_decompression_bomb(self, tmp_path, monkeypatch):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone would refuse 128 x 64 now
        path = tmp_path / "large.png"
        Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_panorama(path).shape == (3, 64, 128)
        assert Image.MAX_IMAGE_PIXELS == 1000  # restored
        with pytest.raises(Image.DecompressionBombError):
            Image.open(path)

    def test_bad_arguments(self, tmp_path):
        path = tmp_path / "ok.png"
        Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(path)
        with pytest.raises(TypeError, match="Expected `path` to be a str or os.PathLike, got int"):
            load_panorama(3)
        with pytest.raises(ValueError, match=r"Argument `max_width` must be in \[1, inf\], got 0"):
            load_panorama(path, max_width=0)
        with pytest.raises(TypeError, match="Expected `max_width` to be an int or None, got float"):
            load_panorama(path, max_width=64.0)
        assert issubclass(PanoramaError, ValueError)

    def test_device(self, tmp_path):
        path = tmp_path / "ok.png"
        Image.fromarray(np.uint8(_smooth_rgb(8, 16) * 255)).save(path)
        cpu = load_panorama(path, device="cpu")
        assert cpu.device.type == "cpu"
        if torch.cuda.is_available():
            assert torch.allclose(load_panorama(path, device="cuda").cpu(), cpu)

    def test_large_jpeg_decodes_at_reduced_scale(self, tmp_path, monkeypatch):
        """With max_width, a big JPEG is decoded at 1/8 scale (libjpeg DCT scaling), never at full size."""
        path = tmp_path / "big.jpg"
        tile = Image.fromarray(np.uint8(_smooth_rgb(256, 512) * 255))
        im = Image.new("RGB", (4096, 2048))
        for x in range(0, 4096, 512):
            for y in range(0, 2048, 256):
                im.paste(tile, (x, y))
        im.save(path, quality=90)
        decoded = []
        original_load = ImageFile.ImageFile.load

        def spy(self):
            decoded.append(self.size)
            return original_load(self)

        monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
        pano = load_panorama(path, max_width=500)
        assert pano.shape == (3, 250, 500)
        assert decoded and max(decoded) == (512, 256)
        reference = np.asarray(tile.resize((500 // 8, 250 // 8), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
        assert np.abs(_as_hwc(pano[:, :31, :62]) - reference[:31, :62]).mean() < 0.03

    @pytest.mark.skipif(not SHARED_PANORAMA.exists(), reason="shared sample panoramas not present")
    def test_real_panorama(self):
        pano = load_panorama(SHARED_PANORAMA)
        assert pano.shape == (3, 1024, 2048)
        small = load_panorama(SHARED_PANORAMA, max_width=512)
        assert small.shape == (3, 256, 512)
        reference = F.interpolate(pano[None], size=(256, 512), mode="bilinear", antialias=True)[0]
        assert (small - reference).abs().mean() < 0.02


# --------------------------------------------------------------------------- synthetic_panorama


def _perspective_nearest(erp: np.ndarray, yaw_deg: float, hfov_deg: float, vfov_deg: float, h: int, w: int):
    """Independent nearest-neighbour ERP -> perspective sampler (pitch 0; edge pixel centres at +-fov/2)."""
    xs = np.linspace(-math.tan(math.radians(hfov_deg) / 2), math.tan(math.radians(hfov_deg) / 2), w)
    ys = np.linspace(math.tan(math.radians(vfov_deg) / 2), -math.tan(math.radians(vfov_deg) / 2), h)
    x, y = np.meshgrid(xs, ys)
    lon = np.arctan2(x, 1.0) + math.radians(yaw_deg)
    lat = np.arctan2(y, np.hypot(x, 1.0))
    big_h, big_w = erp.shape[:2]
    cols = np.round((lon / (2 * math.pi) + 0.5) * big_w - 0.5).astype(int) % big_w
    rows = np.clip(np.round((0.5 - lat / math.pi) * big_h - 0.5).astype(int), 0, big_h - 1)
    return erp[rows, cols], ys


class TestSyntheticPanorama:
    def test_smoke(self):
        pano = synthetic_panorama(64)
        assert pano.shape == (3, 64, 128) and pano.dtype == torch.float32
        assert torch.isfinite(pano).all() and pano.min() >= 0.0 and pano.max() <= 1.0
        assert pano.std() > 0.1  # not flat

    @pytest.mark.parametrize("height", [2, 33, 96])
    def test_cardinality(self, height):
        assert synthetic_panorama(height).shape == (3, height, 2 * height)

    def test_deterministic_per_seed(self):
        a, b = synthetic_panorama(64, seed=3), synthetic_panorama(64, seed=3)
        assert torch.equal(a, b)
        c = synthetic_panorama(64, seed=4)
        assert (a - c).abs().amax(0).gt(0.1).float().mean() > 0.005  # the objects moved
        assert not torch.equal(synthetic_panorama(64), c)

    def test_global_rng_untouched(self):
        torch.manual_seed(123)
        state = torch.get_rng_state()
        synthetic_panorama(32, seed=7)
        assert torch.equal(torch.get_rng_state(), state)

    def test_exception(self):
        with pytest.raises(ValueError, match=r"Argument `height` must be in \[2, inf\], got 1"):
            synthetic_panorama(1)
        with pytest.raises(TypeError, match="Expected `height` to be an int, got float"):
            synthetic_panorama(64.0)
        with pytest.raises(TypeError, match="Expected `seed` to be an int, got str"):
            synthetic_panorama(64, seed="0")

    def test_convention_walls_by_yaw(self):
        """Yaw 0/90/180/270 (lon 0, 90, 180, -90) see the front/right/back/left walls, each its own colour."""
        h = 128
        pano = _as_hwc(synthetic_panorama(h))
        _, labels = _render_scene(h, 0, torch.device("cpu"), offsets=((0.0, 0.0),))
        walls = [(0, _FRONT), (90, _RIGHT), (180, _BACK), (-90, _LEFT)]
        names = list(_WALL_COLORS)
        for lon, face in walls:
            rows = slice(_row(15, h), _row(4, h) + 1)  # plain wall between eye level and the cornice
            cols = [_col(lon + d, 2 * h) for d in (-4, -2, 0, 2, 4)]
            assert (labels[rows][:, cols] == face).all()
            mean = pano[rows][:, cols].reshape(-1, 3).mean(0)
            chroma = mean / mean.sum()
            nearest = min(names, key=lambda f: np.abs(chroma - np.array(_WALL_COLORS[f]) / sum(_WALL_COLORS[f])).sum())
            assert nearest == face

    def test_convention_floor_and_ceiling(self):
        h = 128
        pano = _as_hwc(synthetic_panorama(h))
        _, labels = _render_scene(h, 0, torch.device("cpu"), offsets=((0.0, 0.0),))
        bottom, top = slice(_row(-60, h), h), slice(0, _row(60, h))
        assert (labels[bottom] == _FLOOR).float().mean() > 0.9
        assert (labels[top] == _CEILING).all()
        # The checkerboard: below the equator mostly neutral colours, both dark and light tiles.
        floor = pano[bottom].reshape(-1, 3)
        neutral = floor.max(1) - floor.min(1) < 0.15
        luminance = floor.mean(1)
        assert neutral.mean() > 0.85
        dark, light = np.mean(_FLOOR_COLORS[1]), np.mean(_FLOOR_COLORS[0])
        assert (luminance < (dark + light) / 2).mean() > 0.25 and (luminance > (dark + light) / 2).mean() > 0.25

    def test_straight_edges_in_perspective(self):
        """The floor/front-wall edge and the front wall's corners are straight lines in a perspective view."""
        h = 384
        _, labels = _render_scene(h, 0, torch.device("cpu"), offsets=((0.0, 0.0),))
        view, ys = _perspective_nearest(labels.numpy(), 0.0, 120.0, 90.0, 91, 151)
        expected_row = np.interp(_ROOM_LO[1] / _ROOM_HI[2], ys[::-1], np.arange(len(ys))[::-1])
        checked = 0
        for col in range(view.shape[1]):
            column = view[:, col]
            if (column == _FRONT).sum() < 5:
                continue
            last_front = np.nonzero(column == _FRONT)[0].max()
            if column[last_front + 1] == _OBJECT:  # an object hides the edge here
                continue
            assert column[last_front + 1] == _FLOOR
            assert abs(last_front + 0.5 - expected_row) <= 1.0
            checked += 1
        assert checked > 75
        xs = np.linspace(-math.tan(math.radians(60)), math.tan(math.radians(60)), 151)
        band = view[(ys > 0.02) & (ys < 0.3)]  # wall rows above eye level (no objects), below the ceiling
        first = {int(np.nonzero(row == _FRONT)[0].min()) for row in band}
        last = {int(np.nonzero(row == _FRONT)[0].max()) for row in band}
        assert len(first) == 1 and len(last) == 1  # the corners are vertical lines
        assert abs(first.pop() - 0.5 - np.interp(_ROOM_LO[0] / _ROOM_HI[2], xs, np.arange(len(xs)))) <= 1.0
        assert abs(last.pop() + 0.5 - np.interp(_ROOM_HI[0] / _ROOM_HI[2], xs, np.arange(len(xs)))) <= 1.0

    def test_objects_depend_on_seed(self):
        _, a = _render_scene(64, 0, torch.device("cpu"), offsets=((0.0, 0.0),))
        _, b = _render_scene(64, 1, torch.device("cpu"), offsets=((0.0, 0.0),))
        assert (a == _OBJECT).any() and (b == _OBJECT).any()
        assert not torch.equal(a == _OBJECT, b == _OBJECT)
        assert ((a == _OBJECT) & (torch.arange(64)[:, None] < 32)).sum() == 0  # objects stand below eye level

    def test_device(self):
        cpu = synthetic_panorama(32, device="cpu")
        assert cpu.device.type == "cpu"
        if torch.cuda.is_available():
            assert (synthetic_panorama(32, device="cuda").cpu() - cpu).abs().max() < 1e-3

    @pytest.mark.parametrize(
        "obj, max_area",
        [
            *[(o, 0.2) for seed in range(2) for o in _scene_objects(seed)],
            ({"kind": "sphere", "center": (0.1, -1.2, -2.0), "radius": 0.4, "angle": 0.0, "color": (1, 0, 0)}, 0.2),
            ({"kind": "box", "center": (-0.2, -1.0, -1.5), "half": (0.5, 0.5, 0.3), "radius": 0.77, "angle": 0.4,
              "color": (0, 1, 0)}, 0.3),  # across the +-180 seam
            ({"kind": "sphere", "center": (0.0, -1.2, 0.3), "radius": 0.3, "angle": 0.0, "color": (1, 0, 0)}, 0.2),
        ],
    )
    def test_object_culling_keeps_every_hit(self, obj, max_area):
        """The pixel regions that cull object intersections contain every ray that hits the object."""
        h = 96
        ray = _ray_grid(h, ((-0.25, -0.25), (0.25, 0.25)), torch.device("cpu"))
        t, _ = _shade_object(obj, ray)
        hits = torch.isfinite(t).any(0)  # (H, 2H)
        assert hits.any()
        covered = torch.zeros_like(hits)
        for r0, r1, c0, c1 in _pixel_regions(obj["center"], obj["radius"], h, 2 * h):
            covered[r0:r1, c0:c1] = True
        assert not (hits & ~covered).any()
        assert covered.float().mean() < max_area  # culling does cull
