"""The built-in probe scene: a small room ray-traced into an equirectangular panorama, no file needed.

Same convention as :mod:`panoviz_callback.panorama`: row 0 is the top (up), column ``x`` has
longitude ``((x + 0.5) / W - 0.5) * 360`` degrees; world frame x right, y up, z forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from panoviz_callback._checks import _check_range

__all__ = ["synthetic_panorama"]


# A box room in metres with the camera (eye) at the origin, a little off the room centre.
_ROOM_LO = (-3.6, -1.5, -3.0)
_ROOM_HI = (4.2, 1.3, 3.4)
_LIGHT = (0.3, 0.5, 0.2)  # point light under the ceiling lamp (which sits right above it)
_LAMP_RADIUS = 0.28
# Surface labels (``_render_scene``'s second output) = 2 * axis + (ray leaves towards +axis).
_LEFT, _RIGHT, _FLOOR, _CEILING, _BACK, _FRONT, _OBJECT = range(7)
_NORMALS = {_LEFT: (1, 0, 0), _RIGHT: (-1, 0, 0), _FLOOR: (0, 1, 0), _CEILING: (0, -1, 0), _BACK: (0, 0, 1),
            _FRONT: (0, 0, -1)}
# Material colours (linear in [0, 1]); the walls' base colours first: front, right, back, left.
_MATERIALS = {
    "brick": (0.72, 0.30, 0.22), "paper": (0.25, 0.42, 0.78), "plank": (0.30, 0.55, 0.30), "tile": (0.86, 0.70, 0.25),
    "mortar": (0.82, 0.78, 0.72), "paper_light": (0.30, 0.50, 0.92), "pinstripe": (0.85, 0.88, 0.95),
    "dado": (0.15, 0.22, 0.42), "groove": (0.14, 0.25, 0.14), "rail": (0.70, 0.55, 0.35), "grout": (0.92, 0.90, 0.84),
    "skirting": (0.30, 0.20, 0.12), "cornice": (0.95, 0.95, 0.92),
    "floor_light": (0.88, 0.85, 0.78), "floor_dark": (0.18, 0.20, 0.24),
    "ceiling": (0.90, 0.90, 0.87), "ceiling_seam": (0.72, 0.72, 0.70), "lamp_rim": (0.50, 0.50, 0.52),
    "lamp": (1.0, 0.97, 0.86), "window_frame": (0.95, 0.95, 0.93), "sky": (0.62, 0.80, 1.0),
    "hills": (0.55, 0.78, 0.45),
    "door_frame": (0.85, 0.82, 0.75), "door": (0.48, 0.30, 0.16), "door_panel": (0.30, 0.18, 0.09),
    "brass": (0.90, 0.75, 0.30), "gilt": (0.55, 0.42, 0.18), "canvas_sky": (0.50, 0.72, 0.95),
    "canvas_hill": (0.25, 0.55, 0.25), "sun": (1.0, 0.85, 0.30),
}
_GRADIENT_TO = {"sky": (0.92, 0.96, 1.0)}  # colour at the top of a gradient material
_SELF_LIT = ("lamp", "sky", "hills")  # not shaded by the lamp
_M = {name: i for i, name in enumerate(_MATERIALS)}
_WALL_COLORS = {face: _MATERIALS[name] for face, name in
                ((_FRONT, "brick"), (_RIGHT, "paper"), (_BACK, "plank"), (_LEFT, "tile"))}
_FLOOR_COLORS = (_MATERIALS["floor_light"], _MATERIALS["floor_dark"])
# Features per wall: (kind, u0, u1, v0, v1); u runs to the right as seen facing the wall, v is the height.
_FEATURES = {
    _FRONT: (("window", -2.6, -1.2, 0.9, 2.3), ("window", 0.8, 2.4, 0.9, 2.3)),
    _RIGHT: (("door", -2.3, -1.3, 0.0, 2.1),),
    _BACK: (("painting", 0.7, 2.1, 1.1, 2.0),),
    _LEFT: (("window", -2.4, -0.9, 0.9, 2.3),),
}
# Antialiasing: two rays per pixel, a quarter pixel up-left and down-right of the centre (rows, columns).
_SAMPLE_OFFSETS = ((-0.25, -0.25), (0.25, 0.25))
_PALETTE = (  # object colours
    (0.85, 0.22, 0.18), (0.18, 0.50, 0.85), (0.95, 0.75, 0.18), (0.30, 0.68, 0.32),
    (0.62, 0.32, 0.75), (0.95, 0.50, 0.20), (0.20, 0.72, 0.72), (0.90, 0.40, 0.60),
)


def synthetic_panorama(height: int = 512, seed: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Render the built-in probe: a ray-traced room as an equirectangular panorama.

    The camera stands near the middle of a box room: a brick wall at yaw 0, striped
    wallpaper at yaw 90, wooden planks at yaw 180 and tiles at yaw 270 (each wall its own
    colour), windows, a door and a painting, a checkerboard floor, a ceiling with a lamp
    and a few boxes and spheres on the floor. Every surface is intersected analytically
    per ray, so straight edges stay straight in any perspective view. Two rays per pixel
    are averaged (antialiasing).

    Args:
        height: ``H``; the panorama is ``(3, H, 2H)``.
        seed: varies the objects' placement, size and colour (a local generator; the
            global RNG is untouched). The same seed gives the same image.
        device: where to render (default: CPU).

    Returns:
        The panorama of shape ``(3, H, 2H)``, float32 in ``[0, 1]``.

    Raises:
        TypeError: ``height`` or ``seed`` is not an int.
        ValueError: ``height < 2``.

    Example:
        >>> synthetic_panorama(64).shape
        torch.Size([3, 64, 128])
    """
    for name, value in (("height", height), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Expected `{name}` to be an int, got {type(value).__name__}.")
    _check_range(height, "height", 2)
    return _render_scene(height, seed, torch.device("cpu") if device is None else torch.device(device))[0]


def _render_scene(
    height: int, seed: int, device: torch.device, offsets: tuple[tuple[float, float], ...] = _SAMPLE_OFFSETS
) -> tuple[Tensor, Tensor]:
    """Average the rays at ``offsets`` (pixels) around each pixel centre.

    Returns:
        ``rgb (3, H, 2H)`` and ``labels (H, 2H)`` int64: the surface hit by each pixel's first ray
        (pass ``offsets=((0.0, 0.0),)`` for the labels at the pixel centres).
    """
    k, h, w = len(offsets), height, 2 * height
    ray = _ray_grid(height, offsets, device)  # (3, k, h, w)
    flat = ray.view(3, -1)  # (3, N)

    # The camera is inside the room: each ray leaves through the nearest of the three planes it faces.
    lo, hi = (torch.tensor(b, device=device)[:, None] for b in (_ROOM_LO, _ROOM_HI))
    depth, axis = (torch.where(flat > 0, hi, -lo) / flat.abs().clamp_min(1e-9)).min(0)  # (N,), (N,)
    label = 2 * axis + (flat.gather(0, axis[None])[0] > 0)  # (N,) int64
    point = flat * depth  # (3, N) hit points

    objects = _scene_objects(seed)
    color_a = torch.tensor(list(_MATERIALS.values()), device=device)  # (M, 3)
    color_b = torch.tensor([_GRADIENT_TO.get(m, c) for m, c in _MATERIALS.items()], device=device)  # (M, 3)
    self_lit = torch.tensor([m in _SELF_LIT for m in _MATERIALS], device=device)  # (M,)
    rgb = torch.empty(flat.shape[1], 3, device=device)
    for face in _NORMALS:
        idx = (label == face).nonzero().squeeze(1)
        if idx.numel():
            plane = (_ROOM_LO, _ROOM_HI)[face % 2][face // 2]  # the face's constant coordinate
            coords = [point[i].index_select(0, idx) if i != face // 2 else plane for i in range(3)]
            mat, gain, mix = _room_materials(face, coords, objects)
            gain = torch.where(self_lit.index_select(0, mat), gain, gain * _lighting(coords, _NORMALS[face]))
            color = color_a.index_select(0, mat)
            if mix is not None:
                color = torch.lerp(color, color_b.index_select(0, mat), mix[:, None])
            rgb.index_copy_(0, idx, color.mul_(gain[:, None]))
    rgb, depth, label = rgb.view(k, h, w, 3), depth.view(k, h, w), label.view(k, h, w)
    for obj in objects:
        for r0, r1, c0, c1 in _pixel_regions(obj["center"], obj["radius"], h, w):
            t_obj, color = _shade_object(obj, ray[:, :, r0:r1, c0:c1])
            closer = t_obj < depth[:, r0:r1, c0:c1]
            depth[:, r0:r1, c0:c1] = torch.where(closer, t_obj, depth[:, r0:r1, c0:c1])
            rgb[:, r0:r1, c0:c1] = torch.where(closer[..., None], color, rgb[:, r0:r1, c0:c1])
            label[:, r0:r1, c0:c1].masked_fill_(closer, _OBJECT)
    pano = rgb.sum(0) if k > 1 else rgb[0]  # (h, w, 3)
    return (pano / k).clamp_(0.0, 1.0).contiguous().permute(2, 0, 1), label[0].contiguous()  # channels-last memory


def _ray_grid(height: int, offsets: tuple[tuple[float, float], ...], device: torch.device) -> Tensor:
    """Unit view directions (x, y, z) of the ERP pixel grid shifted by each (row, column) offset: ``(3, k, H, 2H)``."""
    dy, dx = (torch.tensor(o, device=device, dtype=torch.float32)[:, None] for o in zip(*offsets))
    lat = (0.5 - (torch.arange(height, device=device) + 0.5 + dy) / height) * math.pi  # (k, H)
    lon = ((torch.arange(2 * height, device=device) + 0.5 + dx) / (2 * height) - 0.5) * (2 * math.pi)  # (k, 2H)
    ray = torch.empty(3, len(offsets), height, 2 * height, device=device)
    torch.mul(torch.cos(lat)[:, :, None], torch.sin(lon)[:, None, :], out=ray[0])
    ray[1] = torch.sin(lat)[:, :, None]
    torch.mul(torch.cos(lat)[:, :, None], torch.cos(lon)[:, None, :], out=ray[2])
    return ray


def _frac(x: Tensor) -> Tensor:
    return x - torch.floor(x)


def _hash(a: Tensor, b: Tensor) -> Tensor:
    """A repeatable pseudo-random value in [0, 1) per integer cell ``(a, b)``."""
    return _frac(torch.sin(a * 12.9898 + b * 78.233) * 43758.5453)


def _inside(u: Tensor, v: Tensor, u0: float, u1: float, v0: float, v1: float) -> Tensor:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _lighting(point: list[Any], normal: tuple[float, ...] | list[Tensor]) -> Tensor:
    """Ambient plus Lambert from the lamp, falling off with distance: ``(n,)`` (or the points' shape)."""
    to_light = [c - p for c, p in zip(_LIGHT, point)]
    dist2 = to_light[0] ** 2 + to_light[1] ** 2 + to_light[2] ** 2
    dot = to_light[0] * normal[0] + to_light[1] * normal[1] + to_light[2] * normal[2]
    if not isinstance(dot, Tensor):
        dot = torch.full_like(dist2, float(dot))
    return 0.5 + 0.75 * dot.clamp_min(0.0) * torch.rsqrt(dist2.clamp_min(1e-6)) / (1.0 + 0.06 * dist2)


def _room_materials(face: int, coords: list[Any], objects: list[dict]) -> tuple[Tensor, Tensor, Tensor | None]:
    """Material index, brightness gain and gradient position (or None) of room points on ``face``."""
    x, y, z = coords
    if face == _FLOOR:
        checker = ((torch.floor(x / 0.6) + torch.floor(z / 0.6)) % 2).long()
        mat = _M["floor_light"] + (_M["floor_dark"] - _M["floor_light"]) * checker
        gain = torch.ones_like(x)
        for obj in objects:  # soft contact shadows
            near = (1.0 - ((x - obj["center"][0]) ** 2 + (z - obj["center"][2]) ** 2) / (1.3 * obj["footprint"]) ** 2)
            gain -= 0.55 * near.clamp_min(0.0) ** 2
        return mat, gain, None
    if face == _CEILING:
        mat = torch.full_like(x, _M["ceiling"], dtype=torch.long)
        mat.masked_fill_((_frac(x / 1.2) < 0.025) | (_frac(z / 1.2) < 0.025), _M["ceiling_seam"])
        r2 = (x - _LIGHT[0]) ** 2 + (z - _LIGHT[2]) ** 2
        mat.masked_fill_(r2 < (_LAMP_RADIUS + 0.07) ** 2, _M["lamp_rim"])
        mat.masked_fill_(r2 < _LAMP_RADIUS**2, _M["lamp"])
        return mat, torch.ones_like(x), None
    u = {_FRONT: x, _RIGHT: -z, _BACK: -x, _LEFT: z}[face]
    v = y - _ROOM_LO[1]  # height above the floor
    mat, gain = _wall_pattern(face, u, v)
    mix = None
    for kind, *box in _FEATURES[face]:
        sel = _inside(u, v, *box).nonzero().squeeze(1)
        if sel.numel():
            sub_mat, sub_mix = _feature(kind, u[sel], v[sel], *box)
            mat[sel], gain[sel] = sub_mat, 1.0
            if kind == "window":
                mix = torch.zeros_like(u) if mix is None else mix
                mix[sel] = sub_mix
    return mat, gain, mix


def _wall_pattern(face: int, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Each wall's own pattern: material index and a per-cell brightness variation."""
    if face == _FRONT:  # bricks in running bond
        row = torch.floor(v / 0.18)
        uu = u / 0.42 + 0.5 * (row % 2)
        gain = 0.82 + 0.3 * _hash(row, torch.floor(uu))
        mat = torch.full_like(u, _M["brick"], dtype=torch.long)
        mat.masked_fill_((_frac(v / 0.18) < 0.12) | (_frac(uu) < 0.05), _M["mortar"])
    elif face == _RIGHT:  # striped wallpaper above a dark dado
        phase = _frac(u / 0.3)
        gain = torch.ones_like(u)
        mat = _M["paper"] + (_M["paper_light"] - _M["paper"]) * (phase >= 0.5).long()
        mat.masked_fill_((phase - 0.5).abs() < 0.04, _M["pinstripe"])
        mat.masked_fill_(v < 0.9, _M["dado"])
        mat.masked_fill_((v - 0.9).abs() < 0.03, _M["rail"])
    elif face == _BACK:  # vertical planks with grooves and a chair rail
        plank = torch.floor(u / 0.25)
        gain = 0.85 + 0.25 * _hash(plank, plank * 0.5)
        mat = torch.full_like(u, _M["plank"], dtype=torch.long)
        mat.masked_fill_(_frac(u / 0.25) < 0.06, _M["groove"])
        mat.masked_fill_((v - 1.0).abs() < 0.035, _M["rail"])
    else:  # square tiles with grout
        gain = 0.88 + 0.2 * _hash(torch.floor(u / 0.35), torch.floor(v / 0.35))
        mat = torch.full_like(u, _M["tile"], dtype=torch.long)
        mat.masked_fill_((_frac(u / 0.35) < 0.06) | (_frac(v / 0.35) < 0.06), _M["grout"])
    mat.masked_fill_(v < 0.12, _M["skirting"])
    mat.masked_fill_(v > _ROOM_HI[1] - _ROOM_LO[1] - 0.08, _M["cornice"])
    return mat, gain


def _feature(kind: str, u: Tensor, v: Tensor, u0: float, u1: float, v0: float, v1: float) -> tuple[Tensor, Tensor]:
    """A window, door or painting at points inside its rectangle: material index and gradient position."""
    f = 0.07
    inner = _inside(u, v, u0 + f, u1 - f, v0 + f, v1 - f)
    us, vs = (u - u0) / (u1 - u0), (v - v0) / (v1 - v0)
    if kind == "window":
        mat = torch.full_like(u, _M["window_frame"], dtype=torch.long)
        glass = inner & ((u - (u0 + u1) / 2).abs() >= 0.025) & ((v - (v0 + v1) / 2).abs() >= 0.025)
        mat.masked_fill_(glass, _M["sky"])
        mat.masked_fill_(glass & (vs < 0.28 + 0.06 * torch.sin(u * 4.0)), _M["hills"])
        return mat, vs
    if kind == "door":
        mat = torch.full_like(u, _M["door_frame"], dtype=torch.long)
        mat.masked_fill_(inner, _M["door"])
        for p0, p1 in ((0.25, 0.95), (1.15, 1.85)):  # two recessed panels, outlined
            panel = _inside(u, v, u0 + 0.2, u1 - 0.2, p0, p1)
            outline = panel & ~_inside(u, v, u0 + 0.23, u1 - 0.23, p0 + 0.03, p1 - 0.03)
            mat.masked_fill_(outline, _M["door_panel"])
        mat.masked_fill_((u - (u1 - 0.14)) ** 2 + (v - 1.0) ** 2 < 0.04**2, _M["brass"])
        return mat, vs
    mat = torch.full_like(u, _M["gilt"], dtype=torch.long)  # painting: a hill and a sun under a sky
    mat.masked_fill_(inner, _M["canvas_sky"])
    mat.masked_fill_(inner & (vs < 0.35 + 0.15 * torch.sin(us * 6.0)), _M["canvas_hill"])
    mat.masked_fill_(inner & ((us - 0.75) ** 2 + (vs - 0.72) ** 2 < 0.1**2), _M["sun"])
    return mat, vs


def _scene_objects(seed: int) -> list[dict]:
    """Boxes and spheres standing on the floor, placed without overlap by a local generator."""
    gen = torch.Generator().manual_seed(seed)

    def rand(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    colors = torch.randperm(len(_PALETTE), generator=gen).tolist()
    objects: list[dict] = []
    for i, kind in enumerate(("box", "sphere", "box", "sphere", "box")):
        if kind == "sphere":
            r = rand(0.28, 0.5)
            half, footprint, radius = (r, r, r), r, r
        else:
            half = (rand(0.25, 0.55), rand(0.2, 0.55), rand(0.25, 0.55))
            footprint, radius = math.hypot(half[0], half[2]), math.sqrt(sum(h * h for h in half))
        for _ in range(200):
            x = rand(_ROOM_LO[0] + footprint + 0.15, _ROOM_HI[0] - footprint - 0.15)
            z = rand(_ROOM_LO[2] + footprint + 0.15, _ROOM_HI[2] - footprint - 0.15)
            if math.hypot(x, z) > footprint + 1.0 and all(
                math.hypot(x - o["center"][0], z - o["center"][2]) > footprint + o["footprint"] + 0.15 for o in objects
            ):
                break
        else:
            continue  # no free spot left: leave this object out
        color = tuple(min(max(c + rand(-0.06, 0.06), 0.0), 1.0) for c in _PALETTE[colors[i]])
        objects.append({"kind": kind, "center": (x, _ROOM_LO[1] + half[1], z), "half": half,
                        "angle": rand(0, math.pi / 2), "footprint": footprint, "radius": radius, "color": color})
    return objects


def _pixel_regions(center: tuple[float, ...], radius: float, hr: int, wr: int) -> list[tuple[int, int, int, int]]:
    """Row and column ranges of the ERP grid that can see a bounding sphere (split at the +-180 seam)."""
    dist = math.sqrt(sum(c * c for c in center))
    if radius >= 0.999 * dist:
        return [(0, hr, 0, wr)]
    alpha = math.asin(radius / dist)
    lat_c, lon_c = math.asin(center[1] / dist), math.atan2(center[0], center[2])
    r0 = max(math.floor((0.5 - (lat_c + alpha) / math.pi) * hr - 0.5) - 1, 0)
    r1 = min(math.ceil((0.5 - (lat_c - alpha) / math.pi) * hr - 0.5) + 2, hr)
    if abs(lat_c) + alpha >= math.pi / 2 - 1e-6:
        return [(r0, r1, 0, wr)]
    half = math.asin(min(math.sin(alpha) / math.cos(lat_c), 1.0))
    c0 = math.floor(((lon_c - half) / (2 * math.pi) + 0.5) * wr - 0.5) - 1
    c1 = math.ceil(((lon_c + half) / (2 * math.pi) + 0.5) * wr - 0.5) + 2
    if c0 < 0:
        return [(r0, r1, c0 + wr, wr), (r0, r1, 0, c1)]
    if c1 > wr:
        return [(r0, r1, c0, wr), (r0, r1, 0, c1 - wr)]
    return [(r0, r1, c0, c1)]


def _shade_object(obj: dict, ray: Tensor) -> tuple[Tensor, Tensor]:
    """Depth (``inf`` on a miss) ``(h, w)`` and colour ``(h, w, 3)`` of one object for the rays ``(3, h, w)``."""
    dx, dy, dz = ray
    cx, cy, cz = obj["center"]
    base = torch.tensor(obj["color"], dtype=torch.float32, device=ray.device)
    if obj["kind"] == "sphere":
        r = obj["radius"]
        b = dx * cx + dy * cy + dz * cz
        disc = b * b - (cx * cx + cy * cy + cz * cz - r * r)
        t = b - torch.sqrt(disc.clamp_min(0.0))
        hit = (disc > 0) & (t > 0)
        normal = [(d * t - c) / r for d, c in zip(ray, obj["center"])]
        stripe = (torch.floor((torch.atan2(normal[2], normal[0]) + obj["angle"]) / (math.pi / 3)) % 2 == 0)
        white = stripe | (normal[1] > 0.9)
        color = torch.where(white[..., None], torch.tensor((0.95, 0.95, 0.92), device=ray.device), base)
    else:  # a box turned by `angle` about the vertical axis: slab test in its own frame
        cos, sin = math.cos(obj["angle"]), math.sin(obj["angle"])
        origin = (-(cos * cx - sin * cz), -cy, -(sin * cx + cos * cz))  # the camera in box coordinates
        direction = (cos * dx - sin * dz, dy, sin * dx + cos * dz)
        t_near = t_far = near_axis = None
        for a, (o, d, h) in enumerate(zip(origin, direction, obj["half"])):
            d = torch.where(d.abs() < 1e-9, 1e-9, d)
            t1, t2 = (-h - o) / d, (h - o) / d
            lo, hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
            if t_near is None:
                t_near, t_far, near_axis = lo, hi, torch.zeros_like(lo, dtype=torch.long)
            else:
                near_axis = torch.where(lo > t_near, a, near_axis)
                t_near, t_far = torch.maximum(t_near, lo), torch.minimum(t_far, hi)
        t = t_near
        hit = (t_near <= t_far) & (t_near > 0)
        n_local = [torch.where(near_axis == a, -torch.sign(d), 0.0) for a, d in enumerate(direction)]
        normal = [cos * n_local[0] + sin * n_local[2], n_local[1], -sin * n_local[0] + cos * n_local[2]]
        margin = [torch.where(near_axis == a, 1.0, h - (o + d * t).abs())
                  for a, (o, d, h) in enumerate(zip(origin, direction, obj["half"]))]
        edge = torch.minimum(torch.minimum(margin[0], margin[1]), margin[2]) < 0.02
        color = torch.where(edge[..., None], base * 0.45, base)
    point = [d * t for d in ray]
    color = color * _lighting(point, normal)[..., None]
    if obj["kind"] == "sphere":  # a small highlight (Blinn-Phong)
        to_light = [c - p for c, p in zip(_LIGHT, point)]
        inv = torch.rsqrt((to_light[0] ** 2 + to_light[1] ** 2 + to_light[2] ** 2).clamp_min(1e-6))
        half_vec = [q * inv - d for q, d in zip(to_light, ray)]
        inv_h = torch.rsqrt((half_vec[0] ** 2 + half_vec[1] ** 2 + half_vec[2] ** 2).clamp_min(1e-6))
        spec = ((normal[0] * half_vec[0] + normal[1] * half_vec[1] + normal[2] * half_vec[2]) * inv_h).clamp_min(0.0)
        color = color + 0.35 * (spec**40)[..., None]
    return torch.where(hit, t, torch.inf), color
