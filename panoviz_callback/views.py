"""Cameras, view sets and the four crop strategies that cut a panorama into views.

Strategies (``make_views(pano, strategy, image_size, **options)``):

- ``"e2p"``: perspective tiles at pitch 0, ``V = ceil(360 / (fov_deg * (1 - overlap)))`` (8 for
  the defaults ``fov_deg=90, overlap=0.5``) unless ``num_views`` is given, yaws ``k * 360 / V``
  starting at 0; pairs are cyclic neighbours.
- ``"anyres_e2p"``: one global view (the whole ERP letterboxed into the square) followed by the
  e2p tiles of every pitch row in ``pitches`` (row by row); pairs are the cyclic neighbours
  within a row and the tiles of the same yaw in consecutive rows (as listed); the global view takes
  part in no pair.
- ``"cubemap"``: faces front/right/back/left (yaw 0, 90, 180, 270; ``faces=6`` adds up and down,
  pitch +-90) at 90 deg; pairs are the faces that share an edge. They share no area, so their
  patch correspondence is empty.
- ``"sliding_window"``: raw ERP crops (no projection) ``fov_deg`` wide (W/4 for 90 deg), stride
  ``fov_deg * (1 - overlap)`` (W/8), centred at yaws ``k * 360 / V``, wrapping around the seam,
  cut to the square band around the equator (height = width in pixels, no stretching) and
  resized to ``S x S`` with antialiasing. A window is snapped to whole ERP pixels and its camera
  records the exact crop. Pairs are cyclic neighbours; the correspondence is an exact column shift.

Every strategy accepts ``patch_size`` (default 16, ViT-B/16; only used to check that
``image_size`` holds at least one patch).

Pipeline options (the views another preprocessing fed its model, e.g. PanoLLaVA's: see
:func:`panoviz_callback.panollava.views.panollava_view_settings`; they appear in
``ViewSet.options`` only when given, and every camera stays exact for the pixels it describes):

- e2p / anyres_e2p ``yaws``: explicit tile yaws (any order; pairs are neighbours by angle).
- e2p ``central_crop_ratio``: render ``S x S``, cut ``int(S * (1 - r) / 2)`` rows off the top and
  the bottom, stretch back to ``S x S``: a camera with its own vertical FoV,
  ``tan(vfov / 2) = tan(fov / 2) * (S - 2 cut) / S``.
- anyres_e2p ``tile_render_size`` ``R``: tiles rendered at ``R x R`` and resized to ``S`` bilinearly
  without antialiasing (``tan(fov' / 2) = tan(fov / 2) R (S - 1) / (S (R - 1))``);
  ``global_render_size`` ``G``: the ERP letterboxed into ``G x G`` with Pillow's bicubic filter, then
  resized to ``S`` bilinearly.
- sliding_window ``origin``: ``"centre"`` (window k centred at yaw ``k * 360 / V``) or ``"column0"``
  (window k starts at column ``k * int(w (1 - overlap))``, ``w = int(W fov / 360)``);
  ``polar_margin`` ``m``: ``H // m`` rows dropped at the top and the bottom first;
  ``square_tolerance`` (0): cut the band to a centred square (rows, or columns when the band is
  wider than tall) when ``|w / h - 1|`` exceeds it; None keeps the whole band, stretched.
- e2p, sliding_window ``resample``: ``"bilinear"`` (torch, antialiased), ``"bicubic"`` or
  ``"lanczos"`` (Pillow's filters, :mod:`panoviz_callback.resampling`) for the stretch / window resize.
- every strategy ``quantize`` (False): round the panorama and every step an 8-bit pipeline stores
  (a rendered view, a Pillow resize) to 1/255 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from panoviz_callback._checks import _check_choice, _check_range
from panoviz_callback._view_render import crop_rows, cropped_vfov, render_size_fov, render_views
from panoviz_callback.projection import _check_pano, _window_box

__all__ = ["Camera", "ViewSet", "make_views", "STRATEGIES", "STRATEGY_OPTIONS"]

STRATEGIES = ("e2p", "anyres_e2p", "cubemap", "sliding_window")
_KINDS = ("global", "tile", "face", "window")

_DEFAULTS: dict[str, dict[str, Any]] = {
    "e2p": {"fov_deg": 90.0, "overlap": 0.5, "num_views": None, "patch_size": 16},
    "anyres_e2p": {"fov_deg": 90.0, "overlap": 0.5, "num_views": None, "pitches": (0.0,), "patch_size": 16},
    "cubemap": {"faces": 4, "patch_size": 16},
    "sliding_window": {"fov_deg": 90.0, "overlap": 0.5, "num_views": None, "patch_size": 16},
}
# Options that reproduce another pipeline's views; they appear in ``ViewSet.options`` only when given.
_EXTRA: dict[str, dict[str, Any]] = {
    "e2p": {"yaws": None, "central_crop_ratio": None, "resample": "bilinear", "quantize": False},
    "anyres_e2p": {"yaws": None, "tile_render_size": None, "global_render_size": None, "quantize": False},
    "cubemap": {"quantize": False},
    "sliding_window": {"origin": "centre", "polar_margin": None, "square_tolerance": 0.0, "resample": "bilinear",
                       "quantize": False},
}
#: The option names each strategy accepts (``make_views(..., **options)``).
STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {name: (*opts, *_EXTRA[name]) for name, opts in _DEFAULTS.items()}
_RESAMPLE = ("bilinear", "bicubic", "lanczos")
_ORIGINS = ("centre", "column0")


@dataclass(frozen=True)
class Camera:
    """Where one view looks (hashable, so geometry caches can key on it).

    Attributes:
        yaw_deg: longitude of the view centre; positive turns right.
        pitch_deg: latitude of the view centre; positive looks up.
        fov_deg: horizontal field of view (windows: angular width; global: 360).
        kind: ``"global"`` | ``"tile"`` | ``"face"`` | ``"window"``.
        vfov_deg: vertical field of view; ``None`` means the same as ``fov_deg`` (square view).
    """

    yaw_deg: float
    pitch_deg: float
    fov_deg: float
    kind: Literal["global", "tile", "face", "window"]
    vfov_deg: float | None = None

    def __post_init__(self) -> None:
        _check_choice(self.kind, _KINDS, "kind")


@dataclass
class ViewSet:
    """Views cut from one panorama, with their cameras and the pairs the analysis compares.

    Attributes:
        pixels: ``(V, 3, S, S)`` float32 in ``[0, 1]``.
        cameras: ``V`` :class:`Camera` records.
        pairs: adjacent view index pairs ``(i, j)``.
        strategy: the crop strategy.
        image_size: ``S``.
        options: the resolved strategy options (JSON-able).
    """

    pixels: Tensor
    cameras: list[Camera]
    pairs: list[tuple[int, int]]
    strategy: str
    image_size: int
    options: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cameras)

    def to(self, device: torch.device | str) -> ViewSet:
        """A copy with ``pixels`` on ``device`` (cameras and pairs are shared)."""
        return replace(self, pixels=self.pixels.to(device))


def _cyclic(n: int, offset: int = 0) -> list[tuple[int, int]]:
    if n < 2:
        return []
    if n == 2:
        return [(offset, offset + 1)]
    return [(offset + k, offset + (k + 1) % n) for k in range(n)]


def _num_views(opts: dict[str, Any]) -> int:
    if opts["num_views"] is not None:
        return opts["num_views"]
    return max(1, math.ceil(360.0 / (opts["fov_deg"] * (1.0 - opts["overlap"])) - 1e-9))


def _whole(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"Argument `{name}` must be a whole number >= {low}, got {value!r}.")
    _check_range(int(value), name, low)
    return int(value)


def _angle_list(value: Any, name: str, low: float, high: float) -> list[float]:
    values = [value] if isinstance(value, (int, float)) else list(value)
    if not values:
        what = name[:-1] if name.endswith("s") else "angle"
        raise ValueError(f"Argument `{name}` must hold at least one {what} in [{low:g}, {high:g}], got ().")
    for v in values:
        _check_range(float(v), name, low, high)
    return [float(v) for v in values]


def _resolve_extra(strategy: str, opts: dict[str, Any], given: dict[str, Any]) -> None:
    """Validate the pipeline options in ``given`` into ``opts`` (in place)."""
    if given.get("yaws") is not None:
        opts["yaws"] = _angle_list(given["yaws"], "yaws", -360, 360)
        if given.get("num_views") is not None and int(given["num_views"]) != len(opts["yaws"]):
            raise ValueError(
                f"Arguments `num_views` ({given['num_views']}) and `yaws` ({len(opts['yaws'])} angles) disagree."
            )
        opts["num_views"] = len(opts["yaws"])
    if given.get("central_crop_ratio") is not None:
        opts["central_crop_ratio"] = float(given["central_crop_ratio"])
        _check_range(opts["central_crop_ratio"], "central_crop_ratio", 0, 1, low_inclusive=False)
    for name in ("tile_render_size", "global_render_size"):
        if given.get(name) is not None:
            opts[name] = _whole(given[name], name, 2)
    if given.get("polar_margin") is not None:
        opts["polar_margin"] = _whole(given["polar_margin"], "polar_margin", 3)
    if "square_tolerance" in given and given["square_tolerance"] is not None:
        opts["square_tolerance"] = float(given["square_tolerance"])
        _check_range(opts["square_tolerance"], "square_tolerance", 0)
    if "resample" in given:
        _check_choice(given["resample"], _RESAMPLE, "resample")
    if "origin" in given:
        _check_choice(given["origin"], _ORIGINS, "origin")
    if "quantize" in given and not isinstance(given["quantize"], bool):
        raise ValueError(f"Argument `quantize` must be True or False, got {given['quantize']!r}.")


def _resolve(strategy: str, image_size: int, options: dict[str, Any]) -> dict[str, Any]:
    allowed = STRATEGY_OPTIONS[strategy]
    for name in options:
        if name not in allowed:
            raise ValueError(
                f"Unknown option {name!r} for strategy {strategy!r}; expected one of {allowed}."
            )
    opts = {**_DEFAULTS[strategy], **options}
    if "fov_deg" in opts:
        opts["fov_deg"] = float(opts["fov_deg"])
        _check_range(opts["fov_deg"], "fov_deg", 0, 180, low_inclusive=False, high_inclusive=False)
        opts["overlap"] = float(opts["overlap"])
        _check_range(opts["overlap"], "overlap", 0, 1, high_inclusive=False)
        if opts["num_views"] is not None:
            opts["num_views"] = _whole(opts["num_views"], "num_views", 1)
        opts["num_views"] = _num_views(opts)
    if "pitches" in opts:
        opts["pitches"] = _angle_list(opts["pitches"], "pitches", -90, 90)
    if "faces" in opts:
        _check_choice(opts["faces"], (4, 6), "faces")
    _check_range(opts["patch_size"], "patch_size", 1)
    opts["patch_size"] = int(opts["patch_size"])
    _check_range(image_size, "image_size", opts["patch_size"])
    _resolve_extra(strategy, opts, options)
    return opts


def _opt(opts: dict[str, Any], strategy: str, name: str) -> Any:
    return opts.get(name, _EXTRA[strategy].get(name))


def _ring_pairs(yaws: list[float], offset: int = 0) -> list[tuple[int, int]]:
    """Neighbours around the circle (by yaw, whatever the listing order) of one row of views."""
    order = sorted(range(len(yaws)), key=lambda k: (yaws[k] % 360.0, k))
    if order == list(range(len(yaws))):
        return _cyclic(len(yaws), offset)
    ring = _cyclic(len(yaws))
    return [(offset + order[a], offset + order[b]) for a, b in ring]


def _windows(opts: dict[str, Any], erp_h: int, erp_w: int) -> list[Camera]:
    """Window cameras: whole-pixel crops of the ERP (see the module docstring for the rows)."""
    cams = []
    n = opts["num_views"]
    column0 = _opt(opts, "sliding_window", "origin") == "column0"
    margin = erp_h // opts["polar_margin"] if opts.get("polar_margin") else 0
    tolerance = _opt(opts, "sliding_window", "square_tolerance")
    if column0:
        vw = max(1, int(erp_w * opts["fov_deg"] / 360))
        stride = int(vw * (1 - opts["overlap"]))
    for k in range(n):
        if column0:
            c0, ww = k * stride, vw
        else:
            c0, ww, _, _ = _window_box(Camera(k * 360.0 / n, 0.0, opts["fov_deg"], "window"), erp_h, erp_w)
        r0, hh = margin, erp_h - 2 * margin
        if tolerance is not None and abs(ww / hh - 1.0) > tolerance:
            if ww > hh:  # too wide: keep the centre columns
                c0, ww = c0 + (ww - hh) // 2, hh
            else:  # too tall: keep the centre rows
                r0, hh = r0 + (hh - ww) // 2, ww
        yaw = ((c0 + ww / 2) / erp_w - 0.5) * 360.0
        fov = ww * 360.0 / erp_w
        pitch = (0.5 - (r0 + hh / 2) / erp_h) * 180.0
        vfov = hh * 180.0 / erp_h
        cams.append(Camera(yaw, pitch + 0.0, fov, "window", None if abs(vfov - fov) < 1e-9 else vfov))
    return cams


def _tile_cameras(strategy: str, opts: dict[str, Any], image_size: int) -> tuple[list[Camera], list[tuple[int, int]]]:
    n = opts["num_views"]
    yaws = opts.get("yaws") or [k * 360.0 / n for k in range(n)]
    pitches = opts.get("pitches", [0.0])
    fov, vfov = opts["fov_deg"], None
    if opts.get("central_crop_ratio") is not None and crop_rows(image_size, opts["central_crop_ratio"]) > 0:
        vfov = cropped_vfov(fov, image_size, opts["central_crop_ratio"])
    if opts.get("tile_render_size") is not None:
        fov = render_size_fov(fov, opts["tile_render_size"], image_size)
    offset = 1 if strategy == "anyres_e2p" else 0
    cameras = [Camera(0.0, 0.0, 360.0, "global", 180.0)] if offset else []
    cameras += [Camera(y, p, fov, "tile", vfov) for p in pitches for y in yaws]
    pairs = [pair for r in range(len(pitches)) for pair in _ring_pairs(yaws, offset + r * n)]
    pairs += [(offset + r * n + k, offset + (r + 1) * n + k) for r in range(len(pitches) - 1) for k in range(n)]
    return cameras, pairs


def make_views(
    pano: Tensor,
    strategy: Literal["e2p", "anyres_e2p", "cubemap", "sliding_window"] = "e2p",
    image_size: int = 224,
    **options: Any,
) -> ViewSet:
    """Cut a panorama into square views with one of the crop strategies (see the module docstring).

    Args:
        pano: ``(3, H, W)`` equirectangular panorama, float in ``[0, 1]`` (uint8 is scaled by 1/255).
        strategy: ``"e2p"`` | ``"anyres_e2p"`` | ``"cubemap"`` | ``"sliding_window"``.
        image_size: ``S``, the side of every view; at least ``patch_size``.
        **options: per strategy:

            - e2p, sliding_window: ``fov_deg`` (90, in (0, 180)), ``overlap`` (0.5, in [0, 1)),
              ``num_views`` (derived from both when None), ``patch_size`` (16).
            - anyres_e2p: the same plus ``pitches`` ((0,), each in [-90, 90]).
            - cubemap: ``faces`` (4 or 6), ``patch_size``.
            - the pipeline options of the module docstring: ``yaws``, ``central_crop_ratio``
              (in (0, 1]), ``tile_render_size`` / ``global_render_size`` (>= 2), ``origin``,
              ``polar_margin`` (>= 3), ``square_tolerance`` (>= 0 or None), ``resample``,
              ``quantize``.

    Returns:
        A :class:`ViewSet` on the panorama's device, ``pixels`` ``(V, 3, S, S)`` float32.

    Raises:
        ValueError: unknown strategy or option, or an option outside its range (the message names
            the option and the range). TypeError: ``pano`` is not a tensor.

    Example:
        >>> vs = make_views(torch.rand(3, 64, 128), "e2p", image_size=32)
        >>> len(vs), [c.yaw_deg for c in vs.cameras][:3], vs.pairs[:2]
        (8, [0.0, 45.0, 90.0], [(0, 1), (1, 2)])
    """
    _check_choice(strategy, STRATEGIES, "strategy")
    if isinstance(pano, Tensor) and pano.dtype == torch.uint8:
        pano = pano.float() / 255.0
    _check_pano(pano)
    if pano.dim() != 3 or pano.shape[0] != 3:
        raise ValueError(f"Expected `pano` of shape (3, H, W), got {tuple(pano.shape)}.")
    if isinstance(image_size, bool) or int(image_size) != image_size:
        raise ValueError(f"Argument `image_size` must be a whole number, got {image_size!r}.")
    image_size = int(image_size)
    opts = _resolve(strategy, image_size, options)
    _, erp_h, erp_w = pano.shape

    if strategy == "cubemap":
        cameras = [Camera(yaw, 0.0, 90.0, "face") for yaw in (0.0, 90.0, 180.0, 270.0)]
        pairs = _cyclic(4)
        if opts["faces"] == 6:
            cameras += [Camera(0.0, 90.0, 90.0, "face"), Camera(0.0, -90.0, 90.0, "face")]
            pairs += [(k, 4) for k in range(4)] + [(k, 5) for k in range(4)]
    elif strategy == "sliding_window":
        cameras = _windows(opts, erp_h, erp_w)
        pairs = _cyclic(len(cameras))
    else:
        cameras, pairs = _tile_cameras(strategy, opts, image_size)

    pixels = render_views(pano.float(), cameras, image_size, opts)  # (V, 3, S, S)
    return ViewSet(pixels, cameras, pairs, strategy, image_size, opts)
