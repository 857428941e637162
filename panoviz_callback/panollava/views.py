"""PanoLLaVA's view conventions: its processor settings -> ``make_views`` arguments.

PanoLLaVA (``wooseungw/panollava``, MIT) cuts a panorama into views with its
``PanoramaImageProcessor``; the settings below reproduce those views with
:func:`panoviz_callback.views.make_views` (facts read from its source at each revision, our code):

- ``e2p``: ``ceil(360 / (fov (1 - overlap)))`` tiles at yaws ``(k * fov (1 - overlap)) mod 360``
  wrapped to ``(-180, 180]``, pitch 0, each rendered at ``S x S`` (py360convert ``e2p``, 8-bit),
  ``int(S * 0.05)`` rows cut off the top and the bottom (``CENTRAL_CROP_RATIO = 0.9``) and
  stretched back to a square with Pillow's Lanczos filter: a camera of vertical FoV
  ``2 atan(tan(fov / 2) (S - 2 cut) / S)``.
- ``anyres_e2p`` (HEAD, ``dc64bc5``): a global view (the ERP letterboxed into a 336 px square with
  Pillow's bicubic filter, then bilinear to ``S``) and tiles rendered at 672 px and resized to ``S``
  bilinearly (no antialiasing), at the closed-loop yaws ``0, 45, ..., 135, -180, ..., -45``
  (``360 / ceil(360 / (fov (1 - overlap)))`` apart, sorted from 0) and the pitch rows of
  ``[pitch_min, pitch_max]`` (one row at 0 by default).
- ``cubemap``: faces F, R, B, L (py360convert ``e2c``, 8-bit).
- ``sliding_window``: raw ERP crops ``int(W fov / 360)`` px wide starting at column 0 with a stride
  of ``int(width (1 - overlap))`` px, ``H // 12`` rows cut off the top and the bottom; HEAD stretches
  that band (about 150 degrees tall) to a square, ``dc64bc5`` and ``7227614`` cut a centred square
  from it when its aspect ratio is more than 0.1 from 1; resized with Pillow's Lanczos filter.

The view size is ``image_size``; when a HEAD config has none it comes from the ``vision_name``
suffix as PanoLLaVA's trainer infers it (``-256``, ``-560``, ``-384``, ``-224``; else 224).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["panollava_view_settings", "PANOLLAVA_REVISIONS", "PANOLLAVA_STRATEGIES"]

#: Revision names accepted by :func:`panollava_view_settings` -> canonical name.
PANOLLAVA_REVISIONS = {"head": "head", "aa3e2ae": "head", "cora": "head", "dc64bc5": "dc64bc5", "7227614": "7227614"}
#: The crop strategies each revision's processor has that panoviz reproduces.
PANOLLAVA_STRATEGIES = {
    "head": ("e2p", "anyres_e2p", "cubemap", "sliding_window"),
    "dc64bc5": ("e2p", "anyres_e2p", "cubemap", "sliding_window"),
    "7227614": ("e2p", "cubemap", "sliding_window"),
}
_DEFAULT_STRATEGY = {"head": "anyres_e2p", "dc64bc5": "e2p", "7227614": "e2p"}
_CENTRAL_CROP_RATIO = 0.9
_POLAR_MARGIN_RATIO = 12
_ASPECT_RATIO_TOLERANCE = 0.1
_HEAD_SIZE_TAGS = (("-256", 256), ("-560", 560), ("-384", 384), ("-224", 224))
_SECTIONS = ("image_processing", "data", "datamodule", "models", "model")


def _flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys first, then those of known sections (a ``CORAConfig`` as nested dicts), then
    of any other nested mapping; the first occurrence of a key wins."""
    flat: dict[str, Any] = {k: v for k, v in config.items() if not isinstance(v, Mapping)}
    nested = [config[s] for s in _SECTIONS if isinstance(config.get(s), Mapping)]
    nested += [v for k, v in config.items() if isinstance(v, Mapping) and k not in _SECTIONS]
    for section in nested:
        for key, value in _flatten(section).items():
            flat.setdefault(key, value)
    return flat


def _first(flat: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if flat.get(key) is not None:
            return flat[key]
    return default


def _view_size(flat: dict[str, Any], revision: str) -> int:
    size = _first(flat, "image_size")
    if size is None:
        name = str(_first(flat, "vision_name", "vision_model_name", default="") or "")
        if revision == "head":
            return next((s for tag, s in _HEAD_SIZE_TAGS if tag in name.lower()), 224)
        if revision == "7227614":
            return 224  # the datamodule's default image_size
        match = re.search(r"-(\d{3,4})(?:$|[^\d])", name)
        size = int(match.group(1)) if match else 224
        warnings.warn(
            f"PanoLLaVA {revision} took the view size from the vision model's processor; the config has no "
            f"`image_size`, so {size} px is assumed (from {name!r}); pass image_size to override.",
            stacklevel=3,
        )
        return size
    if isinstance(size, (list, tuple)):
        sides = {int(s) for s in size}
        if len(size) != 2 or len(sides) != 1:
            raise ValueError(f"PanoLLaVA `image_size` {list(size)} is not square; panoviz analyses square views.")
        return sides.pop()
    if isinstance(size, bool) or not isinstance(size, (int, float)) or int(size) != size or size < 1:
        raise ValueError(f"PanoLLaVA `image_size` must be a positive whole number or [h, w], got {size!r}.")
    return int(size)


def _norm_180(x: float) -> float:
    return ((x + 180.0) % 360.0) - 180.0


def _anyres_yaws(fov: float, overlap: float, closed_loop: bool) -> list[float]:
    """Tile yaws of PanoLLaVA's anyres_e2p (closed loop: uniform from -180, listed from 0 upwards)."""
    step = fov * (1.0 - overlap)
    if closed_loop:
        n = max(1, math.ceil(360.0 / step))
        yaws: list[float] = []
        cur = -180.0
        for _ in range(n):
            yaw = _norm_180(cur)
            if all(abs(_norm_180(yaw - u)) > 1e-6 for u in yaws):
                yaws.append(yaw)
            cur += 360.0 / n
        return sorted(yaws, key=lambda y: (y + 360.0) % 360.0)
    yaws, cur = [], -180.0 + fov / 2.0
    while cur < 180.0 - fov / 2.0 + 1e-9:
        yaws.append(_norm_180(cur))
        cur += step
    return yaws


def _anyres_pitches(fov: float, overlap: float, low: float, high: float) -> list[float]:
    if abs(high - low) < 1e-6:
        return [float(low)]
    pitches, cur, step = [], low + fov / 2.0, fov * (1.0 - overlap)
    while cur <= high - fov / 2.0 + 1e-9:
        pitches.append(cur)
        cur += step
    if not pitches:
        raise ValueError(
            f"PanoLLaVA anyres pitch range [{low:g}, {high:g}] holds no {fov:g}-degree tile; it made no tiles."
        )
    return pitches


def panollava_view_settings(config: Mapping[str, Any], revision: str) -> dict[str, Any]:
    """``make_views`` arguments that reproduce the views PanoLLaVA's processor fed its model.

    Args:
        config: PanoLLaVA's settings as plain data: flat hyper-parameters (``dc64bc5``,
            ``7227614``: the model's and the datamodule's), or a ``CORAConfig`` as nested dicts
            (HEAD: ``image_processing`` and ``models`` sections). Keys read: ``crop_strategy``,
            ``image_size``, ``vision_name`` / ``vision_model_name``, ``fov_deg`` / ``hfov_deg``,
            ``overlap_ratio`` / ``overlap``, ``use_vision_processor``, and for anyres_e2p
            ``anyres_e2p_base_size`` / ``base_size`` (336), ``anyres_e2p_tile_size`` /
            ``tile_render_size`` (672), ``anyres_e2p_vit_size`` / ``vit_size`` (the view size),
            ``anyres_e2p_closed_loop`` / ``closed_loop_yaw`` (True), ``anyres_e2p_pitch_range`` or
            ``pitch_min`` / ``pitch_max`` ((-45, 45)).
        revision: ``"head"`` (also ``"aa3e2ae"``, ``"cora"``), ``"dc64bc5"`` or ``"7227614"``.

    Returns:
        ``{"strategy": str, "image_size": int, "options": dict, "convention": "panollava-<rev>"}``,
        usable as ``make_views(pano, s["strategy"], s["image_size"], **s["options"])``.

    Raises:
        ValueError: an unknown revision, a strategy that revision does not have or panoviz does not
            reproduce (``anyres``, ``anyres_max``, ``resize``), a non-square ``image_size``.

    Example:
        >>> s = panollava_view_settings({"crop_strategy": "e2p", "image_size": [224, 224]}, "dc64bc5")
        >>> s["strategy"], s["image_size"], s["options"]["yaws"][:5], s["convention"]
        ('e2p', 224, [0.0, 45.0, 90.0, 135.0, 180.0], 'panollava-dc64bc5')
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"Expected `config` to be a mapping of PanoLLaVA settings, got {type(config).__name__}.")
    rev = PANOLLAVA_REVISIONS.get(str(revision).lower())
    if rev is None:
        raise ValueError(f"Argument `revision` must be one of {tuple(PANOLLAVA_REVISIONS)}, got {revision!r}.")
    flat = _flatten(config)
    strategy = str(_first(flat, "crop_strategy", default=_DEFAULT_STRATEGY[rev]))
    if strategy not in PANOLLAVA_STRATEGIES[rev]:
        raise ValueError(
            f"PanoLLaVA {rev} crop_strategy {strategy!r} is not one panoviz reproduces at that revision; "
            f"expected one of {PANOLLAVA_STRATEGIES[rev]}."
        )
    size = _view_size(flat, rev)
    fov = float(_first(flat, "fov_deg", "hfov_deg", default=90.0))
    overlap = float(_first(flat, "overlap_ratio", "overlap", default=0.5))
    resample = "lanczos"
    if _first(flat, "use_vision_processor", default=rev == "head") and strategy != "anyres_e2p":
        resample = "bicubic"
        warnings.warn(
            f"PanoLLaVA {rev} resized these views with the vision model's own processor "
            "(use_vision_processor); assuming one that resizes to a square with bicubic filtering (SigLIP).",
            stacklevel=2,
        )
    stride = fov * (1.0 - overlap)
    n = math.ceil(360.0 / stride)
    options: dict[str, Any] = {"quantize": True}
    if strategy == "e2p":
        yaws = [(k * stride) % 360.0 for k in range(n)]
        options.update(fov_deg=fov, overlap=overlap, yaws=[y - 360.0 if y > 180 else y for y in yaws],
                       central_crop_ratio=_CENTRAL_CROP_RATIO, resample=resample)
    elif strategy == "cubemap":
        options.update(faces=4)
    elif strategy == "sliding_window":
        options.update(fov_deg=fov, overlap=overlap, num_views=n, origin="column0", polar_margin=_POLAR_MARGIN_RATIO,
                       square_tolerance=None if rev == "head" else _ASPECT_RATIO_TOLERANCE, resample=resample)
    else:
        pitch_range = _first(flat, "anyres_e2p_pitch_range")
        low, high = (pitch_range if pitch_range is not None
                     else (_first(flat, "pitch_min", default=-45.0), _first(flat, "pitch_max", default=45.0)))
        closed = bool(_first(flat, "anyres_e2p_closed_loop", "closed_loop_yaw", default=True))
        size = int(_first(flat, "anyres_e2p_vit_size", "vit_size", default=size))
        options.update(
            fov_deg=fov, overlap=overlap, yaws=_anyres_yaws(fov, overlap, closed),
            pitches=_anyres_pitches(fov, overlap, float(low), float(high)),
            tile_render_size=int(_first(flat, "anyres_e2p_tile_size", "tile_render_size", default=672)),
            global_render_size=int(_first(flat, "anyres_e2p_base_size", "base_size", default=336)),
        )
    return {"strategy": strategy, "image_size": size, "options": options, "convention": f"panollava-{rev}"}
