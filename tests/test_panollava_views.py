"""PanoLLaVA's views: ``panollava_view_settings`` + ``make_views`` against an independent reference.

The reference re-does PanoLLaVA's ``PanoramaImageProcessor`` tensor path step by step from the
facts read in its source (HEAD ``src/cora/processors/images.py`` / ``anyres_e2p.py``,
``dc64bc5`` ``src/panovlm/processors/image.py`` / ``anyres_e2p.py``, ``7227614``
``panovlm/processors/image.py``) with the libraries it uses: py360convert's ``e2p`` / ``e2c`` on
``uint8`` arrays, Pillow crops and resizes, ``F.interpolate``. PanoLLaVA itself is not installable
here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import SHARED_PANORAMAS
from panoviz_callback.panollava.views import PANOLLAVA_STRATEGIES, panollava_view_settings
from panoviz_callback.panorama import load_panorama, synthetic_panorama
from panoviz_callback.views import STRATEGY_OPTIONS, make_views

py360convert = pytest.importorskip("py360convert")

CASES = [(rev, s) for rev, strategies in PANOLLAVA_STRATEGIES.items() for s in strategies]
TOLERANCE = 1.0  # mean absolute difference on a 0-255 scale: the "within 1/255 mean"


# ---- the reference: PanoLLaVA's processing, re-done with py360convert / Pillow / torch -------------
def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arr, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _ref_e2p(img: np.ndarray, size: int, fov: float, overlap: float) -> torch.Tensor:
    stride = fov * (1 - overlap)
    yaws = (np.arange(math.ceil(360 / stride)) * stride) % 360
    yaws = np.where(yaws > 180, yaws - 360, yaws)
    out = []
    for yaw in yaws:
        view = py360convert.e2p(img, fov_deg=fov, u_deg=float(yaw), v_deg=0, out_hw=(size, size), mode="bilinear")
        cut = int(size * (1 - 0.9) / 2)  # CENTRAL_CROP_RATIO = 0.9
        pil = Image.fromarray(view[cut:size - cut].astype(np.uint8))
        out.append(_to_tensor(pil.resize((size, size), Image.Resampling.LANCZOS)))
    return torch.stack(out)


def _ref_cubemap(img: np.ndarray, size: int) -> torch.Tensor:
    faces = py360convert.e2c(img, face_w=size, cube_format="dict")
    return torch.stack([
        _to_tensor(Image.fromarray(faces[k].astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS))
        for k in ("F", "R", "B", "L")
    ])


def _ref_sliding(img: np.ndarray, size: int, fov: float, overlap: float, square: bool) -> torch.Tensor:
    pil = Image.fromarray(img)
    w, h = pil.size
    vw = int(w * fov / 360)
    stride = int(vw * (1 - overlap))
    margin = h // 12  # POLAR_MARGIN_RATIO
    out = []
    for i in range(math.ceil(360 / (fov * (1 - overlap)))):
        s = i * stride
        if s + vw <= w:
            patch = pil.crop((s, 0, s + vw, h))
        else:
            patch = Image.new("RGB", (vw, h))
            patch.paste(pil.crop((s, 0, w, h)), (0, 0))
            patch.paste(pil.crop((0, 0, s + vw - w, h)), (w - s, 0))
        patch = patch.crop((0, margin, vw, h - margin))
        eff = h - 2 * margin
        if square and abs(vw / eff - 1) > 0.1:  # dc64bc5 / 7227614: ASPECT_RATIO_TOLERANCE
            if vw > eff:
                left = (vw - eff) // 2
                patch = patch.crop((left, 0, left + eff, eff))
            else:
                top = (eff - vw) // 2
                patch = patch.crop((0, top, vw, top + vw))
        out.append(_to_tensor(patch.resize((size, size), Image.Resampling.LANCZOS)))
    return torch.stack(out)


def _ref_anyres(img: np.ndarray, size: int, fov: float, overlap: float) -> torch.Tensor:
    pil = Image.fromarray(img)
    w, h = pil.size
    scale = 336 / max(w, h)  # base_size
    nw, nh = int(round(w * scale)), int(round(h * scale))
    canvas = Image.new("RGB", (336, 336), (0, 0, 0))
    canvas.paste(pil.resize((nw, nh), Image.BICUBIC), ((336 - nw) // 2, (336 - nh) // 2))
    views = [_to_tensor(np.array(canvas))]
    n = max(1, math.ceil(360 / (fov * (1 - overlap))))  # closed-loop yaws from -180, listed from 0
    yaws = sorted({round(((-180 + k * 360 / n + 180) % 360) - 180, 9) for k in range(n)}, key=lambda y: y % 360)
    for yaw in yaws:
        tile = py360convert.e2p(img[:, :, ::-1], fov, yaw, 0.0, out_hw=(672, 672))[:, :, ::-1]  # BGR in, as there
        views.append(_to_tensor(np.ascontiguousarray(tile)))
    return torch.cat([
        F.interpolate(v.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False) for v in views
    ])


def _reference(img: np.ndarray, revision: str, strategy: str, size: int, fov: float, overlap: float) -> torch.Tensor:
    if strategy == "e2p":
        return _ref_e2p(img, size, fov, overlap)
    if strategy == "cubemap":
        return _ref_cubemap(img, size)
    if strategy == "sliding_window":
        return _ref_sliding(img, size, fov, overlap, square=revision != "head")
    return _ref_anyres(img, size, fov, overlap)


def _ours(img: np.ndarray, revision: str, config: dict) -> tuple[torch.Tensor, dict]:
    settings = panollava_view_settings({**config, "use_vision_processor": False}, revision)
    pano = torch.from_numpy(img).permute(2, 0, 1)  # uint8 (3, H, W)
    vs = make_views(pano, settings["strategy"], settings["image_size"], **settings["options"])
    return vs.pixels, settings


def _mean_abs_255(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().mean() * 255)


@pytest.fixture(scope="module")
def room_u8() -> np.ndarray:
    pano = synthetic_panorama(256, seed=3)  # (3, 256, 512), a ray-traced room with texture and edges
    return (pano.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# ---- every strategy at every revision --------------------------------------------------------------
@pytest.mark.parametrize(("revision", "strategy"), CASES)
def test_views_equal_reference(room_u8, revision, strategy):
    config = {"crop_strategy": strategy, "image_size": [64, 64], "fov_deg": 90.0, "overlap_ratio": 0.5}
    ours, settings = _ours(room_u8, revision, config)
    ref = _reference(room_u8, revision, strategy, 64, 90.0, 0.5)
    assert settings["convention"] == f"panollava-{revision}"
    assert _mean_abs_255(ours, ref) < TOLERANCE / 4


@pytest.mark.parametrize(("revision", "strategy"), [("head", "sliding_window"), ("dc64bc5", "e2p"),
                                                    ("7227614", "sliding_window"), ("head", "anyres_e2p")])
def test_views_other_settings(room_u8, revision, strategy):
    # a stride that does not divide 360 (7 views, the last one wrapping the seam), another size
    config = {"crop_strategy": strategy, "image_size": 48, "fov_deg": 100.0, "overlap_ratio": 0.3,
              "anyres_e2p_pitch_range": (0.0, 0.0)}  # [-45, 45] holds no 100-degree row
    ours, _ = _ours(room_u8, revision, config)
    ref = _reference(room_u8, revision, strategy, 48, 100.0, 0.3)
    assert _mean_abs_255(ours, ref) < TOLERANCE / 4


@pytest.mark.skipif(not SHARED_PANORAMAS.is_dir(), reason="no shared panorama photographs")
@pytest.mark.parametrize(("revision", "strategy"), CASES)
def test_views_equal_reference_photo(revision, strategy):
    path = sorted(SHARED_PANORAMAS.glob("*.jpg"))[0]
    pano = load_panorama(path, max_width=1024)
    img = (pano.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    config = {"crop_strategy": strategy, "image_size": 224}
    ours, _ = _ours(img, revision, config)
    assert _mean_abs_255(ours, _reference(img, revision, strategy, 224, 90.0, 0.5)) < TOLERANCE


def test_py360_convention_differs(room_u8):
    """The default (py360convert-convention) views are not PanoLLaVA's: the choice matters."""
    pano = torch.from_numpy(room_u8).permute(2, 0, 1)
    default = make_views(pano, "e2p", 64).pixels
    ref = _reference(room_u8, "head", "e2p", 64, 90.0, 0.5)
    assert _mean_abs_255(default, ref) > 4 * TOLERANCE


# ---- the settings themselves ---------------------------------------------------------------------
def test_settings_e2p_cameras():
    s = panollava_view_settings({"crop_strategy": "e2p", "image_size": [224, 224]}, "7227614")
    assert s == {
        "strategy": "e2p", "image_size": 224, "convention": "panollava-7227614",
        "options": {"quantize": True, "fov_deg": 90.0, "overlap": 0.5, "central_crop_ratio": 0.9,
                    "yaws": [0.0, 45.0, 90.0, 135.0, 180.0, -135.0, -90.0, -45.0], "resample": "lanczos"},
    }
    vs = make_views(torch.rand(3, 64, 128), s["strategy"], s["image_size"], **s["options"])
    # 11 rows cut off each side of 224: tan(vfov / 2) = 202 / 224
    assert {round(c.vfov_deg, 9) for c in vs.cameras} == {round(math.degrees(2 * math.atan(202 / 224)), 9)}
    assert vs.pairs == [(k, (k + 1) % 8) for k in range(8)]
    assert set(s["options"]) <= set(STRATEGY_OPTIONS["e2p"])


def test_settings_anyres_cameras():
    s = panollava_view_settings({"crop_strategy": "anyres_e2p", "image_size": 224}, "dc64bc5")
    assert s["options"]["yaws"] == [0.0, 45.0, 90.0, 135.0, -180.0, -135.0, -90.0, -45.0]
    assert s["options"]["pitches"] == [0.0]
    assert (s["options"]["tile_render_size"], s["options"]["global_render_size"]) == (672, 336)
    vs = make_views(torch.rand(3, 64, 128), s["strategy"], s["image_size"], **s["options"])
    # rendered at 672 and resized to 224 (align_corners=False): tan(fov' / 2) = 672 * 223 / (224 * 671)
    fov = math.degrees(2 * math.atan(672 * 223 / (224 * 671)))
    assert all(c.fov_deg == pytest.approx(fov, abs=1e-9) and c.vfov_deg is None for c in vs.cameras[1:])
    # neighbours around the circle, whatever the listing order
    assert sorted(vs.pairs) == sorted([(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 1)])


def test_settings_sliding_window_cameras():
    s = panollava_view_settings({"crop_strategy": "sliding_window", "image_size": 32, "use_vision_processor": False},
                                "head")
    vs = make_views(torch.rand(3, 240, 480), s["strategy"], s["image_size"], **s["options"])
    # 120 px windows from column 0 with a 60 px stride, rows 20..220 (240 // 12 = 20 off each side)
    assert [c.yaw_deg for c in vs.cameras] == pytest.approx([-135.0 + 45.0 * k for k in range(8)])
    assert {(c.fov_deg, c.vfov_deg, c.pitch_deg) for c in vs.cameras} == {(90.0, 150.0, 0.0)}
    s = panollava_view_settings({"crop_strategy": "sliding_window", "image_size": 32}, "dc64bc5")
    vs = make_views(torch.rand(3, 240, 480), s["strategy"], s["image_size"], **s["options"])
    assert {(c.fov_deg, c.vfov_deg, c.pitch_deg) for c in vs.cameras} == {(90.0, None, 0.0)}


@pytest.mark.parametrize(
    ("name", "size"),
    [("google/siglip2-so400m-patch16-256", 256), ("google/siglip-large-patch16-384", 384),
     ("DeepGlint-AI/rice-vit-large-patch14-560", 560), ("facebook/dinov2-small", 224)],
)
def test_settings_view_size_from_vision_name(name, size):
    config = {"models": {"vision_name": name},
              "image_processing": {"crop_strategy": "e2p", "image_size": None, "use_vision_processor": False}}
    assert panollava_view_settings(config, "head")["image_size"] == size


def test_settings_flat_hparams_and_aliases():
    flat = {"vision_name": "google/siglip-base-patch16-224", "crop_strategy": "anyres_e2p", "image_size": [256, 256],
            "hfov_deg": 120.0, "overlap": 0.25, "closed_loop_yaw": False, "base_size": 224, "tile_render_size": 512,
            "vit_size": 192, "pitch_min": 10.0, "pitch_max": 10.0}
    s = panollava_view_settings(flat, "aa3e2ae")
    assert s["image_size"] == 192 and s["convention"] == "panollava-head"
    opts = s["options"]
    assert (opts["fov_deg"], opts["overlap"]) == (120, 0.25)
    assert (opts["tile_render_size"], opts["global_render_size"]) == (512, 224)
    assert opts["yaws"] == [-120.0, -30.0, 60.0]  # from -180 + 60, 90 apart, while below 180 - 60
    assert opts["pitches"] == [10.0]  # an equal range is one row at that pitch


def test_settings_vision_processor_warns():
    with pytest.warns(UserWarning, match="vision model's own processor"):
        s = panollava_view_settings({"image_processing": {"crop_strategy": "e2p", "image_size": [256, 256]}}, "head")
    assert s["options"]["resample"] == "bicubic"


def test_settings_missing_size_warns_before_head():
    with pytest.warns(UserWarning, match=r"384 px is assumed"):
        s = panollava_view_settings({"crop_strategy": "e2p", "vision_name": "google/siglip-so400m-patch14-384"},
                                    "dc64bc5")
    assert s["image_size"] == 384


@pytest.mark.parametrize(
    ("config", "revision", "error", "match"),
    [
        ({"crop_strategy": "e2p"}, "v2", ValueError, r"Argument `revision` must be one of"),
        ({"crop_strategy": "anyres_e2p"}, "7227614", ValueError, r"'anyres_e2p' is not one panoviz reproduces"),
        ({"crop_strategy": "anyres_max"}, "head", ValueError, r"'anyres_max' is not one panoviz reproduces"),
        ({"crop_strategy": "e2p", "image_size": [224, 336]}, "dc64bc5", ValueError, r"is not square"),
        ({"crop_strategy": "e2p", "image_size": "big"}, "dc64bc5", ValueError, r"positive whole number"),
        ({"crop_strategy": "anyres_e2p", "pitch_min": -10.0, "pitch_max": 10.0}, "head", ValueError,
         r"holds no 90-degree tile"),
        ([("crop_strategy", "e2p")], "head", TypeError, r"Expected `config` to be a mapping"),
    ],
)
def test_settings_exception(config, revision, error, match):
    with pytest.raises(error, match=match):
        panollava_view_settings(config, revision)
