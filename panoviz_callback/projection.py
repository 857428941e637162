"""Sphere <-> pixel geometry for every camera kind, and batched sampling of equirectangular images.

Convention:
    The same as py360convert's ``e2p`` (version 1.0.4 checked numerically), so results can be
    cross-checked against it.

    - Equirectangular (ERP) image ``(C, H, W)``: the pixel centre of column ``x`` has longitude
      ``lon = ((x + 0.5) / W - 0.5) * 360`` degrees, row ``y`` has latitude
      ``lat = (0.5 - (y + 0.5) / H) * 180``. Row 0 is the top (north). Longitude 0 is the centre of
      the image and grows to the right. Columns wrap around the +-180 deg seam; the row above row 0
      is row 0 shifted by ``W // 2`` columns (the neighbour across the pole), likewise below ``H - 1``.
    - World frame: x right, y up, z forward (lon 0, lat 0). ``lon = atan2(x, z)``,
      ``lat = atan2(y, hypot(x, z))``.
    - Camera: ``yaw_deg`` looks at longitude ``yaw_deg`` (positive yaw turns right, towards +x),
      positive ``pitch_deg`` looks up. Camera-to-world rotation ``R = R_y(yaw) @ R_x(pitch)``, its
      columns are the camera's right, up and forward axes. ``e2p(u_deg=yaw_deg, v_deg=pitch_deg)``
      (py360convert negates ``u`` internally; the result is the same direction).
    - Pixel coordinates ``(x, y)``: pixel centres at integers, x to the right, y down; an image of
      width ``w`` spans ``[-0.5, w - 0.5]``. An image of another resolution covering the same view
      (a token grid, a PCA image) maps to view pixels by ``x_view = (x_img + 0.5) * S / w_img - 0.5``.
    - Perspective cameras (kinds ``"tile"``, ``"face"``): the centres of the edge pixels lie at
      +-fov/2, i.e. ``tan_x = tan(fov/2) * (2 x / (w - 1) - 1)`` and
      ``tan_y = tan(vfov/2) * (1 - 2 y / (h - 1))`` (py360convert's ``linspace(-tan, tan, w)``).
    - Windows (kind ``"window"``): a raw lon/lat crop of the ERP, linear in angle; the pixel *edges*
      lie at +-fov/2 (it is a crop of whole pixels): ``lon = yaw + ((x + 0.5) / w - 0.5) * fov``,
      ``lat = pitch - ((y + 0.5) / h - 0.5) * vfov``.
    - Global (kind ``"global"``): the whole ERP (360 x 180 deg) resized to ``S x hc`` with
      ``hc = round(S / 2)`` and letterboxed into ``S x S`` (black bars, ``top = (S - hc) // 2``
      rows above); yaw and pitch are ignored.
    - "Inside" a camera means strictly inside its field of view, shrunk by a relative 1e-6: a point
      on the edge shared by two cube faces is inside neither, so cube faces never correspond.
    - Bilinear sampling wraps like py360convert's one-pixel padding: a neighbour column left of 0
      is column ``W - 1`` (and vice versa), a neighbour row above 0 / below ``H - 1`` is that row
      shifted by ``W // 2`` columns. The full panorama is never copied, whatever its memory layout:
    - ERP in channels-last memory (``pano.permute(1, 2, 0)`` contiguous, e.g. a ``(C, H, W)`` view
      of an ``(H, W, C)`` NumPy/PIL array), bilinear: the flat indices ``row * W + col`` of the 4
      neighbours of every view pixel and their weights are cached per geometry (float64 maths,
      wrapping included) and one ``embedding_bag`` over the ``(H * W, C)`` view of the panorama
      sums them. Other layouts or ``mode="nearest"``: one ``grid_sample`` with normalised
      coordinates and ``align_corners=False``, i.e. ``g = (x + 0.5) / w * 2 - 1`` for pixel
      coordinate ``x``, ``padding_mode="border"``; the few bilinear samples within half a pixel of
      the seam or a pole are then recomputed with the wrapped neighbours. The two agree to ~1e-5
      in float32 (``grid_sample`` un-normalises its float32 grid; the gather weights come from
      float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from numbers import Real
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from panoviz_callback._checks import _check_choice, _check_range

__all__ = [
    "CameraLike",
    "lonlat_to_direction",
    "direction_to_lonlat",
    "camera_rotation",
    "pixel_to_direction",
    "direction_to_pixel",
    "erp_to_perspective",
    "sample_views",
    "clear_cache",
]

_PERSPECTIVE_KINDS = ("tile", "face")
_KINDS = ("global", "tile", "face", "window")
_MODES = ("bilinear", "nearest")
_INSIDE_EPS = 1e-6
_CACHE_SIZE = 16


class CameraLike(Protocol):
    """Anything with the fields of :class:`panoviz_callback.views.Camera`."""

    yaw_deg: float
    pitch_deg: float
    fov_deg: float
    kind: str
    vfov_deg: float | None


def lonlat_to_direction(lon_deg: Tensor, lat_deg: Tensor) -> Tensor:
    """Unit directions for longitudes/latitudes in degrees.

    Args:
        lon_deg: ``(*)`` longitudes, 0 at the ERP centre, positive to the right.
        lat_deg: ``(*)`` latitudes, positive up.

    Returns:
        ``(*, 3)`` unit vectors (x right, y up, z forward).

    Example:
        >>> lonlat_to_direction(torch.tensor([0.0, 90.0]), torch.tensor([0.0, 0.0])).round(decimals=6).abs()
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    lon, lat = torch.deg2rad(lon_deg), torch.deg2rad(lat_deg)
    return torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()], dim=-1)


def direction_to_lonlat(dirs: Tensor) -> tuple[Tensor, Tensor]:
    """Longitude in ``[-180, 180]`` and latitude in ``[-90, 90]`` (degrees) of ``(*, 3)`` directions."""
    x, y, z = dirs.unbind(-1)
    return torch.rad2deg(torch.atan2(x, z)), torch.rad2deg(torch.atan2(y, torch.hypot(x, z)))


def camera_rotation(yaw_deg: Tensor, pitch_deg: Tensor) -> Tensor:
    """Camera-to-world rotations ``R_y(yaw) @ R_x(pitch)``.

    Args:
        yaw_deg: ``(*)`` yaws, positive turns right.
        pitch_deg: ``(*)`` pitches, positive looks up.

    Returns:
        ``(*, 3, 3)``; columns are the camera's right, up and forward axes in world coordinates.
    """
    a, p = torch.deg2rad(yaw_deg), torch.deg2rad(pitch_deg)
    ca, sa, cp, sp = a.cos(), a.sin(), p.cos(), p.sin()
    zero = torch.zeros_like(a)
    right = torch.stack([ca, zero, -sa], dim=-1)
    up = torch.stack([-sp * sa, cp, -sp * ca], dim=-1)
    forward = torch.stack([cp * sa, sp, cp * ca], dim=-1)
    return torch.stack([right, up, forward], dim=-1)  # (*, 3, 3)


def _rotate(rot: Tensor, vec: Tensor) -> Tensor:
    """``rot (*, 3, 3) @ vec (*, 3)`` with broadcasting, as three multiply-adds (small batched
    matmuls and einsum are slow on CPU)."""
    return vec[..., 0:1] * rot[..., 0] + vec[..., 1:2] * rot[..., 1] + vec[..., 2:3] * rot[..., 2]


class _Params(NamedTuple):
    kind: Tensor  # (V,) 0 perspective, 1 window, 2 global
    yaw: Tensor  # (V,) degrees
    pitch: Tensor
    fov: Tensor
    vfov: Tensor


def _params(cameras: Sequence[CameraLike], like: Tensor) -> _Params:
    for cam in cameras:
        _check_choice(cam.kind, _KINDS, "kind")
    code = {"tile": 0, "face": 0, "window": 1, "global": 2}
    rows = [
        (code[c.kind], c.yaw_deg, c.pitch_deg, c.fov_deg, c.fov_deg if c.vfov_deg is None else c.vfov_deg)
        for c in cameras
    ]
    t = torch.tensor(rows, dtype=like.dtype, device=like.device).reshape(-1, 5)
    return _Params(t[:, 0].round().long(), t[:, 1], t[:, 2], t[:, 3], t[:, 4])


def _letterbox(size: int) -> tuple[int, int]:
    """(top, content height) of the global view's ERP inside an ``size x size`` square."""
    hc = max(1, int(math.floor(size / 2 + 0.5)))
    return (size - hc) // 2, hc


def _as_batch(cameras: CameraLike | Sequence[CameraLike], pts: Tensor) -> tuple[list, Tensor, bool]:
    single = not isinstance(cameras, Sequence)
    cams = [cameras] if single else list(cameras)
    return cams, (pts.unsqueeze(0) if single else pts), single


def _bcast(p: Tensor, ndim: int) -> Tensor:
    return p.reshape(p.shape[0], *([1] * (ndim - 1)))


def pixel_to_direction(
    xy: Tensor, cameras: CameraLike | Sequence[CameraLike], image_size: int
) -> tuple[Tensor, Tensor]:
    """Viewing directions of pixel coordinates in square ``image_size x image_size`` views.

    Args:
        xy: ``(*, 2)`` pixel coordinates for one camera, or ``(V, *, 2)`` (broadcastable, e.g.
            ``(1, N, 2)``) for a sequence of ``V`` cameras.
        cameras: a camera (see :class:`CameraLike`) or a sequence of them.
        image_size: ``S``, the side of the square views.

    Returns:
        ``(dirs, valid)``: unit directions ``(..., 3)`` and a bool mask ``(...)`` that is False
        only in the letterbox bars of a global view.
    """
    cams, xy, single = _as_batch(cameras, xy)
    prm = _params(cams, xy)
    x, y = xy[..., 0], xy[..., 1]
    nd = x.dim()
    kind, yaw, pitch, fov, vfov = (_bcast(p, nd) for p in prm)
    present = set(prm.kind.tolist())
    s = float(image_size)
    dirs, valid = {}, {}
    if 0 in present:  # perspective
        tx = torch.tan(torch.deg2rad(fov) / 2) * (2 * x / (s - 1) - 1)
        ty = torch.tan(torch.deg2rad(vfov) / 2) * (1 - 2 * y / (s - 1))
        ray = torch.stack([tx, ty, torch.ones_like(tx)], dim=-1)
        rot = camera_rotation(prm.yaw, prm.pitch).reshape(len(cams), *([1] * (nd - 1)), 3, 3)
        dirs[0], valid[0] = F.normalize(_rotate(rot, ray), dim=-1), None
    if 1 in present:  # window
        dirs[1] = lonlat_to_direction(yaw + ((x + 0.5) / s - 0.5) * fov, pitch - ((y + 0.5) / s - 0.5) * vfov)
        valid[1] = None
    if 2 in present:  # global
        top, hc = _letterbox(image_size)
        v = (y + 0.5 - top) / hc + 0 * kind  # broadcast over the cameras
        dirs[2] = lonlat_to_direction(((x + 0.5) / s - 0.5) * 360, (0.5 - v) * 180)
        valid[2] = (v >= 0) & (v <= 1)
    out = _select(kind.unsqueeze(-1), dirs)
    everywhere = torch.ones_like(out[..., 0], dtype=torch.bool)
    ok = _select(kind, {k: everywhere if m is None else m for k, m in valid.items()})
    ok = ok.expand(out.shape[:-1])
    return (out[0], ok[0]) if single else (out, ok)


def _select(kind: Tensor, values: dict[int, Tensor]) -> Tensor:
    """Per camera the value of its kind (``kind`` broadcasts against the values)."""
    codes = sorted(values)
    out = values[codes[-1]]
    for code in reversed(codes[:-1]):
        out = torch.where(kind == code, values[code], out)
    return out


def direction_to_pixel(
    dirs: Tensor, cameras: CameraLike | Sequence[CameraLike], image_size: int
) -> tuple[Tensor, Tensor]:
    """Pixel coordinates of directions in square views, and whether they are inside the view.

    Args:
        dirs: ``(*, 3)`` unit directions for one camera, or ``(V, *, 3)`` (broadcastable) for a
            sequence of ``V`` cameras.
        cameras: a camera or a sequence of them.
        image_size: ``S``.

    Returns:
        ``(xy, inside)``: pixel coordinates ``(..., 2)`` (finite but meaningless where a direction
        is behind a perspective camera) and a bool mask ``(...)``: strictly inside the field of
        view (see the module's ``Convention:``).
    """
    cams, dirs, single = _as_batch(cameras, dirs)
    prm = _params(cams, dirs)
    nd = dirs.dim() - 1
    kind, yaw, pitch, fov, vfov = (_bcast(p, nd) for p in prm)
    present = set(prm.kind.tolist())
    s = float(image_size)
    xs, ys, ins = {}, {}, {}
    if 0 in present:  # perspective
        rot = camera_rotation(prm.yaw, prm.pitch).reshape(len(cams), *([1] * (nd - 1)), 3, 3)
        cam = _rotate(rot.transpose(-1, -2), dirs)  # world -> camera
        cz = cam[..., 2]
        front = cz > 1e-9
        czs = torch.where(front, cz, torch.ones_like(cz))
        tan_x, tan_y = torch.tan(torch.deg2rad(fov) / 2), torch.tan(torch.deg2rad(vfov) / 2)
        tx, ty = cam[..., 0] / czs, cam[..., 1] / czs
        xs[0] = (tx / tan_x + 1) * (s - 1) / 2
        ys[0] = (1 - ty / tan_y) * (s - 1) / 2
        ins[0] = front & (tx.abs() < tan_x * (1 - _INSIDE_EPS)) & (ty.abs() < tan_y * (1 - _INSIDE_EPS))
    if present - {0}:
        lon, lat = direction_to_lonlat(dirs)
    if 1 in present:  # window
        dlon = torch.remainder(lon - yaw + 180, 360) - 180
        dlat = lat - pitch
        xs[1] = (dlon / fov + 0.5) * s - 0.5
        ys[1] = (0.5 - dlat / vfov) * s - 0.5
        ins[1] = (dlon.abs() < fov / 2 * (1 - _INSIDE_EPS)) & (dlat.abs() < vfov / 2 * (1 - _INSIDE_EPS))
    if 2 in present:  # global: sees the whole sphere
        top, hc = _letterbox(image_size)
        xs[2] = (lon / 360 + 0.5) * s - 0.5 + 0 * kind
        ys[2] = top + (0.5 - lat / 180) * hc - 0.5 + 0 * kind
        ins[2] = torch.ones_like(xs[2], dtype=torch.bool)
    xy = torch.stack([_select(kind, xs), _select(kind, ys)], dim=-1)
    inside = _select(kind, ins)
    return (xy[0], inside[0]) if single else (xy, inside)


class _Sampler(NamedTuple):
    grid: Tensor  # (V, h, w, 2) normalised for the unpadded ERP
    fix_view: Tensor  # (M,) view of each sample within half a pixel of the seam or a pole
    fix_pix: Tensor  # (M,) its flat pixel position in the view
    fix_y: Tensor  # (M, 4) ERP rows of its bilinear neighbours
    fix_x: Tensor  # (M, 4) ERP columns of its bilinear neighbours
    fix_w: Tensor  # (M, 4) bilinear weights


class _Taps(NamedTuple):
    index: Tensor  # (V*h*w*4,) flat ERP pixels ``row * W + col`` of the 4 neighbours of each view pixel
    offsets: Tensor  # (V*h*w + 1,) where each view pixel's 4 taps start (the ``embedding_bag`` bags)
    weight: Tensor  # (V*h*w*4,) bilinear weights


def _erp_coords(
    views: tuple[tuple[float, float, float, float], ...], h: int, w: int, erp_h: int, erp_w: int
) -> tuple[Tensor, Tensor]:
    """Float64 ERP pixel coordinates ``(px, py)``, each ``(V, h, w)``, seen by perspective views
    ``(yaw, pitch, hfov, vfov)``."""
    p = torch.tensor(views, dtype=torch.float64)  # (V, 4)
    tx = torch.linspace(-1, 1, w, dtype=torch.float64) * torch.tan(torch.deg2rad(p[:, 2:3]) / 2)  # (V, w)
    ty = torch.linspace(1, -1, h, dtype=torch.float64) * torch.tan(torch.deg2rad(p[:, 3:4]) / 2)  # (V, h)
    rot = camera_rotation(p[:, 0], p[:, 1])[:, :, :, None, None]  # (V, 3, 3, 1, 1)
    # world direction of the ray (tx, ty, 1), one (V, h, w) component at a time
    x, y, z = (rot[:, i, 0] * tx[:, None, :] + (rot[:, i, 1] * ty[:, :, None] + rot[:, i, 2]) for i in range(3))
    lon = torch.atan2(x, z)  # (V, h, w) radians
    lat = torch.atan2(y, torch.hypot(x, z))
    return lon.mul_(erp_w / (2 * math.pi)).add_(erp_w / 2 - 0.5), lat.mul_(-erp_h / math.pi).add_(erp_h / 2 - 0.5)


def _bilinear_taps(px: Tensor, py: Tensor, erp_h: int, erp_w: int) -> tuple[Tensor, Tensor, Tensor]:
    """ERP rows, columns and weights, each ``(4, N)`` float64 (top-left, top-right, bottom-left,
    bottom-right), of the bilinear neighbours of ``(N,)`` float64 coordinates in
    ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``, wrapped across the seam and over the poles (see
    ``Convention:``). Rows and columns are whole numbers."""
    x0, y0 = px.floor(), py.floor()
    wx, wy = px - x0, py - y0
    rows, cols, wts = px.new_empty(3, 4, px.numel()).unbind(0)  # (4, N) each
    for dy in (0, 1):
        yy = y0 + dy
        c0 = x0.where((yy >= 0) & (yy <= erp_h - 1), x0 - erp_w // 2)  # across a pole: W // 2 columns on
        c0 = c0.where(c0 >= 0, c0 + erp_w)  # in [0, W - 1]
        c1 = (c0 + 1).where(c0 < erp_w - 1, c0 + (1 - erp_w))
        torch.clamp(yy, 0, erp_h - 1, out=rows[2 * dy])
        rows[2 * dy + 1] = rows[2 * dy]
        cols[2 * dy], cols[2 * dy + 1] = c0, c1
        wy_k = wy if dy else 1 - wy
        torch.mul(wy_k, 1 - wx, out=wts[2 * dy])
        torch.mul(wy_k, wx, out=wts[2 * dy + 1])
    return rows, cols, wts


@lru_cache(maxsize=_CACHE_SIZE)
def _perspective_sampler(
    views: tuple[tuple[float, float, float, float], ...], h: int, w: int, erp_h: int, erp_w: int, device: str,
    dtype: torch.dtype,
) -> _Sampler:
    """``grid_sample`` grid (and seam/pole fix-ups) for perspective views ``(yaw, pitch, hfov, vfov)``."""
    px, py = _erp_coords(views, h, w, erp_h, erp_w)  # (V, h, w)
    grid = torch.stack([(px + 0.5) / erp_w * 2 - 1, (py + 0.5) / erp_h * 2 - 1], dim=-1)  # (V, h, w, 2)
    px, py = px.reshape(-1), py.reshape(-1)
    fix = torch.nonzero((px < 0) | (px > erp_w - 1) | (py < 0) | (py > erp_h - 1)).squeeze(1)
    rows, cols, wts = (t.T for t in _bilinear_taps(px[fix], py[fix], erp_h, erp_w))  # (M, 4)
    dev = torch.device(device)
    return _Sampler(
        grid.to(dev, dtype), (fix // (h * w)).to(dev), (fix % (h * w)).to(dev), rows.to(dev, torch.long),
        cols.to(dev, torch.long), wts.to(dev, dtype),
    )


@lru_cache(maxsize=_CACHE_SIZE)
def _perspective_taps(
    views: tuple[tuple[float, float, float, float], ...], h: int, w: int, erp_h: int, erp_w: int, device: str,
    dtype: torch.dtype,
) -> _Taps:
    """Bilinear taps of perspective views ``(yaw, pitch, hfov, vfov)`` for a gather from an
    ``(H * W, C)`` panorama."""
    px, py = _erp_coords(views, h, w, erp_h, erp_w)
    rows, cols, wts = _bilinear_taps(px.reshape(-1), py.reshape(-1), erp_h, erp_w)  # (4, N)
    index_dtype = torch.int32 if erp_h * erp_w < 2**31 else torch.int64
    index = rows.mul_(erp_w).add_(cols).to(index_dtype)  # (4, N), exact: whole numbers below 2**53
    dev = torch.device(device)
    return _Taps(  # pixel-major (N, 4); a transposing copy between equal dtypes takes the fast blocked path
        index.T.contiguous().reshape(-1).to(dev), torch.arange(0, index.numel() + 1, 4, dtype=index_dtype, device=dev),
        wts.to(dtype).T.contiguous().reshape(-1).to(dev),
    )


def _is_channels_last(pano: Tensor) -> bool:
    """Whether ``(B, C, H, W)`` lies in ``(B, H, W, C)`` memory (each image a contiguous ``(H * W, C)`` table)."""
    return pano.permute(0, 2, 3, 1).is_contiguous()


def _sample_perspective(
    pano: Tensor, views: list[tuple[float, float, float, float]], hw: tuple[int, int], mode: str
) -> Tensor:
    """``pano (B, C, H, W)`` -> ``(V, B * C, h, w)`` in one batched op (the panorama is not copied)."""
    b, c, erp_h, erp_w = pano.shape
    h, w = hw
    n = len(views)
    key = (tuple(views), h, w, erp_h, erp_w, str(pano.device), pano.dtype)
    if mode == "bilinear" and _is_channels_last(pano):
        taps = _perspective_taps(*key)
        table = pano.permute(0, 2, 3, 1).reshape(b, erp_h * erp_w, c)  # a view: (B, H*W, C)
        out = [
            F.embedding_bag(taps.index, table[k], taps.offsets, mode="sum", per_sample_weights=taps.weight,
                            include_last_offset=True)
            for k in range(b)
        ]  # B x (V*h*w, C)
        out = out[0].unsqueeze(0) if b == 1 else torch.stack(out)  # (B, V*h*w, C)
        out = out.reshape(b, n, h, w, c).permute(1, 0, 4, 2, 3)  # (V, B, C, h, w)
        return out.contiguous().view(n, b * c, h, w)  # the same memory layout as the grid_sample path
    flat = pano.reshape(b * c, erp_h, erp_w)  # a view unless a batch is in an unusual layout
    smp = _perspective_sampler(*key)
    # an expanded (stride-0) batch: every view samples the same panorama without a copy
    out = F.grid_sample(flat.unsqueeze(0).expand(n, -1, -1, -1), smp.grid, mode=mode, padding_mode="border",
                        align_corners=False)  # (V, B*C, h, w)
    if mode == "bilinear" and smp.fix_pix.numel():
        taps = flat[:, smp.fix_y, smp.fix_x]  # (B*C, M, 4); any memory layout
        out.view(n, b * c, h * w)[smp.fix_view, :, smp.fix_pix] = (taps * smp.fix_w).sum(dim=-1).T
    return out


def _window_box(cam: CameraLike, erp_h: int, erp_w: int) -> tuple[int, int, int, int]:
    """(first column, width, first row, height) of a window camera's crop, snapped to whole pixels."""
    vfov = cam.fov_deg if cam.vfov_deg is None else cam.vfov_deg
    ww = max(1, int(math.floor(cam.fov_deg * erp_w / 360 + 0.5)))
    hh = max(1, min(erp_h, int(math.floor(vfov * erp_h / 180 + 0.5))))
    c0 = int(math.floor(erp_w / 2 + cam.yaw_deg * erp_w / 360 - ww / 2 + 0.5))
    r0 = int(math.floor(erp_h / 2 - cam.pitch_deg * erp_h / 180 - hh / 2 + 0.5))
    return c0, ww, min(max(r0, 0), erp_h - hh), hh


def _window_crops(flat: Tensor, cameras: Sequence[CameraLike]) -> list[tuple[list[int], Tensor]]:
    """The ERP crops of the window cameras of ``flat (C', H, W)``, batched by crop size: a list of
    (view indices, ``(n, C', hh, ww)`` crops), columns wrapping around the seam."""
    erp_h, erp_w = flat.shape[-2:]
    groups: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for k, cam in enumerate(cameras):
        if cam.kind == "window":
            c0, ww, r0, hh = _window_box(cam, erp_h, erp_w)
            groups.setdefault((ww, r0, hh), []).append((k, c0))
    out = []
    for (ww, r0, hh), members in groups.items():
        cols = (torch.tensor([c0 for _, c0 in members])[:, None] + torch.arange(ww)).remainder(erp_w)
        crop = flat[:, r0:r0 + hh].index_select(2, cols.reshape(-1).to(flat.device))  # (C', hh, n*ww)
        crop = crop.reshape(flat.shape[0], hh, len(members), ww).permute(2, 0, 1, 3)  # (n, C', hh, ww)
        out.append(([k for k, _ in members], crop))
    return out


def _check_pano(pano: object, name: str = "pano") -> None:
    if not isinstance(pano, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(pano).__name__}.")
    if pano.dim() not in (3, 4) or pano.shape[-1] < 2 or pano.shape[-2] < 2:
        raise ValueError(f"Expected `{name}` of shape (C, H, W) or (B, C, H, W), got {tuple(pano.shape)}.")
    if not pano.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating point tensor in [0, 1], got {pano.dtype}.")


def _angles(value: float | Sequence[float] | Tensor, name: str) -> tuple[list[float], bool]:
    if isinstance(value, Tensor):
        if value.dim() > 1:
            raise ValueError(f"Expected `{name}` to be a scalar or 1-D, got shape {tuple(value.shape)}.")
        return [float(v) for v in value.reshape(-1).tolist()], value.dim() == 0
    if isinstance(value, Real):
        return [float(value)], True
    vals = [float(v) for v in value]
    if not vals:
        raise ValueError(f"Expected `{name}` to hold at least one angle, got an empty sequence.")
    return vals, False


def erp_to_perspective(
    pano: Tensor,
    yaw_deg: float | Sequence[float] | Tensor,
    pitch_deg: float | Sequence[float] | Tensor,
    fov_deg: float | tuple[float, float],
    out_hw: tuple[int, int],
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> Tensor:
    """Perspective views of an equirectangular panorama, like py360convert's ``e2p``.

    All views are sampled by one batched op on the panorama's device, with no copy of the panorama:
    an ``embedding_bag`` gather of the 4 bilinear neighbours when the panorama lies in channels-last
    memory (the fastest: a ``(C, H, W)`` view of ``(H, W, C)`` memory, e.g.
    ``torch.from_numpy(hwc).permute(2, 0, 1)``), else ``grid_sample``. The taps / sampling grid are
    cached per (geometry, sizes, device, dtype). Seamless across the +-180 deg seam and over the
    poles. Like ``e2p`` there is no antialiasing (a 224 px, 90 deg view of a 2048 px panorama
    samples every ~3rd pixel). See the module's ``Convention:`` block.

    Args:
        pano: ``(C, H, W)`` or ``(B, C, H, W)`` floating point panorama(s).
        yaw_deg: a scalar or ``V`` yaws (1-D sequence or tensor); positive turns right.
        pitch_deg: a scalar or ``V`` pitches; positive looks up. Broadcast against ``yaw_deg``.
        fov_deg: horizontal field of view, or ``(h_fov, v_fov)``; each in ``(0, 180)``.
        out_hw: ``(h, w)`` of each view.
        mode: ``"bilinear"`` (default) or ``"nearest"``.

    Returns:
        ``(C, h, w)`` for scalar angles or ``(V, C, h, w)``; with a batch ``(B, C, h, w)`` or
        ``(B, V, C, h, w)``.

    Raises:
        ValueError: bad shapes, angles, sizes or mode. TypeError: a non-float panorama.

    Example:
        >>> pano = torch.rand(3, 64, 128)
        >>> erp_to_perspective(pano, [0, 90, 180, 270], 0, 90, (32, 32)).shape
        torch.Size([4, 3, 32, 32])
    """
    _check_pano(pano)
    _check_choice(mode, _MODES, "mode")
    yaws, yaw_scalar = _angles(yaw_deg, "yaw_deg")
    pitches, pitch_scalar = _angles(pitch_deg, "pitch_deg")
    if len(yaws) != len(pitches) and 1 not in (len(yaws), len(pitches)):
        raise ValueError(f"Expected `yaw_deg` and `pitch_deg` of the same length, got {len(yaws)} and {len(pitches)}.")
    n = max(len(yaws), len(pitches))
    yaws, pitches = yaws * (n // len(yaws)), pitches * (n // len(pitches))
    if isinstance(fov_deg, Tensor) and fov_deg.numel() == 1:
        fov_deg = float(fov_deg)
    hfov, vfov = (fov_deg, fov_deg) if isinstance(fov_deg, Real) else tuple(fov_deg)
    _check_range(float(hfov), "fov_deg", 0, 180, low_inclusive=False, high_inclusive=False)
    _check_range(float(vfov), "fov_deg", 0, 180, low_inclusive=False, high_inclusive=False)
    h, w = (int(v) for v in out_hw)
    _check_range(min(h, w), "out_hw", 2)
    batched = pano.dim() == 4
    b, c, erp_h, erp_w = pano.shape if batched else (1, *pano.shape)
    views = [(y, p, float(hfov), float(vfov)) for y, p in zip(yaws, pitches)]
    out = _sample_perspective(pano if batched else pano.unsqueeze(0), views, (h, w), mode)  # (V, B*C, h, w)
    out = out.reshape(n, b, c, h, w).transpose(0, 1)  # (B, V, C, h, w)
    out = out if b == 1 else out.contiguous()
    if yaw_scalar and pitch_scalar:
        out = out[:, 0]
    return out if batched else out[0]


def sample_views(
    pano: Tensor, cameras: Sequence[CameraLike], image_size: int, mode: Literal["bilinear", "nearest"] = "bilinear"
) -> Tensor:
    """Render square views of any camera kind from an equirectangular panorama.

    Perspective cameras (tile/face) are sampled together in one batched op as in
    :func:`erp_to_perspective` (no antialiasing, like py360convert); windows are crops of whole ERP
    pixels (wrapping around the seam; a window camera is snapped to pixel edges) resized to ``S``
    with antialiasing; the global view is the whole ERP resized with antialiasing and letterboxed
    (black bars).

    Args:
        pano: ``(C, H, W)`` or ``(B, C, H, W)`` floating point panorama(s).
        cameras: ``V`` cameras (see :class:`CameraLike`).
        image_size: ``S``.
        mode: interpolation of the perspective views.

    Returns:
        ``(V, C, S, S)`` or ``(B, V, C, S, S)``.
    """
    _check_pano(pano)
    _check_choice(mode, _MODES, "mode")
    _check_range(image_size, "image_size", 2)
    batched = pano.dim() == 4
    b, c, erp_h, erp_w = pano.shape if batched else (1, *pano.shape)
    pano4 = pano if batched else pano.unsqueeze(0)  # (B, C, H, W)
    s = int(image_size)
    params = _params(cameras, torch.empty(0, dtype=torch.float64))
    persp = [k for k, cam in enumerate(cameras) if cam.kind in _PERSPECTIVE_KINDS]
    views = [(cameras[k].yaw_deg, cameras[k].pitch_deg, float(params.fov[k]), float(params.vfov[k])) for k in persp]
    if len(persp) == len(cameras):
        out = _sample_perspective(pano4, views, (s, s), mode)  # (V, B*C, S, S)
    else:
        out = pano.new_zeros(len(cameras), b * c, s, s)
        if persp:
            out[persp] = _sample_perspective(pano4, views, (s, s), mode)
    flat = pano4.reshape(b * c, erp_h, erp_w) if len(persp) < len(cameras) else None  # (B*C, H, W)
    for members, crop in _window_crops(flat, cameras) if flat is not None else []:
        out[members] = F.interpolate(crop, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    glob = [k for k, cam in enumerate(cameras) if cam.kind == "global"]
    if glob:
        top, hc = _letterbox(s)
        res = F.interpolate(flat.unsqueeze(0), size=(hc, s), mode="bilinear", antialias=True, align_corners=False)
        out[glob, :, top:top + hc] = res  # (1, C', hc, S) broadcast over the global views
    out = out.reshape(len(cameras), b, c, s, s).transpose(0, 1)  # (B, V, C, S, S)
    return out.contiguous() if batched else out[0]


def clear_cache() -> None:
    """Drop the cached sampling grids and taps (for example after moving to another device)."""
    _perspective_sampler.cache_clear()
    _perspective_taps.cache_clear()
