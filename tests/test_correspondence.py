import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from panoviz_callback.correspondence import _correspondence, patch_correspondence, stitch_equirect, warp_pairs
from panoviz_callback.views import make_views

GRID = (14, 14)
S = 224
S_SMALL = 112  # direction checks at 8 px tokens keep the tests fast; the geometry is the same
# angular size of a central token of a 90 deg perspective view (tokens near the edges are half as big)
TOKEN_DEG = math.degrees(2 * math.tan(math.radians(45)) / (S_SMALL - 1) * S_SMALL / GRID[1])  # 8.2 deg


def _token_directions(views, which=slice(None), grid=GRID) -> torch.Tensor:
    """Independent token directions: mean decoded direction of each token's pixels, ``(V, N, 3)``."""
    pooled = F.adaptive_avg_pool2d(views.pixels[which].double() * 2 - 1, grid)  # (V, 3, gh, gw)
    return F.normalize(pooled.flatten(2).transpose(1, 2), dim=-1)


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.acos((a * b).sum(-1).clamp(-1, 1)))


def _check_against_directions(views, i, j, token_deg):
    """Independent check on a direction-encoding panorama rendered into both views.

    Token centres of view i are looked up among all pixels of view j by their encoded direction
    (brute force); tokens whose nearest pixel is well inside view j must be matched, to the token
    holding that pixel; tokens whose direction is nowhere in view j must not be matched; matched
    tokens' mean directions agree within a token.
    """
    gh, gw = GRID
    size = views.image_size
    idx_i, idx_j = patch_correspondence(views, i, j, GRID)
    assert len(idx_i) == len(idx_j)
    pix = F.normalize(views.pixels[[i, j]] * 2 - 1, dim=1)  # (2, 3, S, S) decoded directions
    centre = F.avg_pool2d(pix[0], 2, stride=1)  # mean of 2 x 2 pixels: centred between pixels
    step = size // gw
    centre = centre[:, step // 2 - 1::step, step // 2 - 1::step]  # (3, gh, gw) token centre directions
    centre = F.normalize(centre.flatten(1).T, dim=-1)  # (N, 3)
    cos, nearest = (centre @ pix[1].flatten(1)).max(dim=1)  # (N,) nearest pixel of view j
    angle = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))
    px, py = nearest % size, nearest // size
    pixel_deg = 90 / size
    well_inside = (angle < pixel_deg) & (px > 0) & (px < size - 1) & (py > 0) & (py < size - 1)
    outside = angle > 2 * pixel_deg
    matched = torch.zeros(gh * gw, dtype=torch.bool)
    matched[idx_i] = True
    assert matched[well_inside].all() and not matched[outside].any()
    partner = torch.full((gh * gw,), -1)
    partner[idx_i] = idx_j
    expected = (py // step) * gw + px // step
    clear = well_inside & (px % step > 0) & (px % step < step - 1) & (py % step > 0) & (py % step < step - 1)
    assert torch.equal(partner[clear], expected[clear])
    if len(idx_i):
        dirs = _token_directions(views, [i, j])  # (2, N, 3)
        err = _angle_deg(dirs[0, idx_i], dirs[1, idx_j])
        assert err.max() < token_deg and err.mean() < 0.4 * token_deg, (float(err.max()), float(err.mean()))
    return idx_i, idx_j


def test_e2p_against_direction_panorama(direction_panorama):
    vs = make_views(direction_panorama(256).float(), "e2p", image_size=S_SMALL, patch_size=8)
    for i, j in [(0, 1), (7, 0), (1, 0), (0, 2)]:
        idx_i, _ = _check_against_directions(vs, i, j, TOKEN_DEG)
        assert len(idx_i) == 92 if (i, j) != (0, 2) else len(idx_i) == 0  # 90 deg apart: only an edge in common


def test_anyres_e2p_tiles_with_pitches(direction_panorama):
    pano = direction_panorama(256).float()
    vs = make_views(pano, "anyres_e2p", image_size=S_SMALL, patch_size=8, pitches=(-45, 0, 45))
    pairs = [(1, 2), (17, 18), (1, 9), (9, 17), (20, 12), (24, 17)]  # rows, columns, a diagonal, the seam
    for i, j in pairs:
        _check_against_directions(vs, i, j, TOKEN_DEG)
    # the rows at +-45 deg overlap more than the equator row (meridians converge)
    n_eq, n_up = (len(patch_correspondence(vs, i, i + 1, GRID)[0]) for i in (9, 17))
    assert n_up > n_eq == 92


def test_global_view_correspondence(direction_panorama):
    vs = make_views(direction_panorama(256).float(), "anyres_e2p", image_size=S_SMALL, patch_size=8)
    token_deg = 360 / GRID[1]  # a global token spans 25.7 deg of longitude
    dirs = _token_directions(vs)
    idx_tile, idx_glob = patch_correspondence(vs, 1, 0, GRID)
    assert len(idx_tile) == 196  # the global view sees everything
    assert _angle_deg(dirs[1, idx_tile], dirs[0, idx_glob]).max() < token_deg
    idx_glob, _ = patch_correspondence(vs, 0, 1, GRID)
    assert (idx_glob // GRID[1]).min() >= 3 and (idx_glob // GRID[1]).max() <= 10  # never a letterbox-bar token


def test_sliding_window_exact_column_shift(direction_panorama):
    # windows of 128 ERP px (14 tokens) with a stride of 64 px (7 tokens)
    vs = make_views(direction_panorama(256).float(), "sliding_window", image_size=S_SMALL, patch_size=8)
    expected_i = torch.tensor([r * 14 + c for r in range(14) for c in range(7, 14)])
    for i, j in vs.pairs:
        idx_i, idx_j = patch_correspondence(vs, i, j, GRID)
        assert torch.equal(idx_i, expected_i) and torch.equal(idx_j, expected_i - 7), (i, j)
    _check_against_directions(vs, 7, 0, 90 / GRID[1])  # across the seam; window tokens are 6.4 deg


def test_overlap_fraction_and_column_strip_error():
    """90 deg views 45 deg apart: the true overlap is ~47% of the tokens, not 50%, and pairing
    tokens by column strip (column c <-> c - 7, same row) is wrong by up to 2-3 tokens."""
    vs = make_views(torch.rand(3, 64, 128), "e2p", image_size=S)
    idx_i, idx_j = patch_correspondence(vs, 0, 1, GRID)
    fraction = len(idx_i) / 196
    print(f"overlap fraction at 90 deg / 50%: {fraction:.3f} ({len(idx_i)} of 196 tokens)")
    assert fraction == pytest.approx(92 / 196) and 0.46 < fraction < 0.48
    row, col = idx_i // 14, idx_i % 14
    naive_row, naive_col = row, col - 7
    assert (col >= 7).all()  # the matched tokens all lie in the strip...
    err = torch.maximum((idx_j // 14 - naive_row).abs(), (idx_j % 14 - naive_col).abs())
    wrong = float((err > 0).double().mean())
    print(f"column-strip pairing error (tokens): max {int(err.max())}, mean {err.double().mean():.2f}, "
          f"wrong {wrong:.0%}")
    assert 1 <= err.max() <= 3
    assert (err > 0).double().mean() > 0.25
    assert 98 - len(idx_i) == 6  # ...but 6 strip tokens see nothing of the other view


@pytest.mark.parametrize(("faces", "size", "grid"), [(4, S, GRID), (6, S, GRID), (4, 30, (15, 10)), (6, 32, (16, 16))])
def test_cubemap_is_empty(faces, size, grid):
    vs = make_views(torch.rand(3, 32, 64), "cubemap", image_size=size, faces=faces, patch_size=1)
    for i, j in vs.pairs:
        for a, b in ((i, j), (j, i)):
            idx_a, idx_b = patch_correspondence(vs, a, b, grid)
            assert idx_a.numel() == 0 and idx_b.numel() == 0 and idx_a.dtype == torch.long


def test_cubemap_pixel_grid_shares_only_the_edge_rays():
    """With one token per pixel the edge pixel centres of two faces are the same rays (both at 45 deg):
    those, and only those, correspond (edge column to edge column)."""
    vs = make_views(torch.rand(3, 32, 64), "cubemap", image_size=32, faces=4, patch_size=1)
    idx_a, idx_b = patch_correspondence(vs, 0, 1, (32, 32))
    assert len(idx_a) > 0
    assert (idx_a % 32 == 31).all() and (idx_b % 32 == 0).all() and torch.equal(idx_a // 32, idx_b // 32)


def test_correspondence_cache_and_copies(device):
    vs = make_views(torch.rand(3, 32, 64), "e2p", image_size=32, patch_size=2)
    first_i, first_j = patch_correspondence(vs, 2, 3, (8, 8), device=device)
    hits = _correspondence.cache_info().hits
    first_i.zero_()  # callers cannot corrupt the cache
    again_i, _ = patch_correspondence(vs, 2, 3, (8, 8))
    assert _correspondence.cache_info().hits == hits + 1
    assert again_i.abs().sum() > 0 and first_j.device.type == device.type
    # the same geometry from another panorama hits the cache too
    patch_correspondence(make_views(torch.rand(3, 16, 32), "e2p", image_size=32, patch_size=2), 2, 3, (8, 8))
    assert _correspondence.cache_info().hits == hits + 2


def test_exception():
    vs = make_views(torch.rand(3, 16, 32), "e2p", image_size=16)
    with pytest.raises(ValueError, match=r"Argument `j` must be in \[0, 7\], got 8"):
        patch_correspondence(vs, 0, 8, GRID)
    with pytest.raises(TypeError, match="Expected `i` to be an int"):
        patch_correspondence(vs, 0.5, 1, GRID)
    with pytest.raises(ValueError, match=r"Argument `grid_hw` must be in \[1, inf\], got 0"):
        patch_correspondence(vs, 0, 1, (0, 14))
    with pytest.raises(ValueError, match=r"Expected `images` of shape \(V, C, h, w\), got \(8, 16, 16\)"):
        warp_pairs(vs.pixels[:, 0], vs)
    with pytest.raises(ValueError, match=r"one image per view \(8\), got 7"):
        stitch_equirect(vs.pixels[:7], vs)
    with pytest.raises(ValueError, match="Argument `mode` must be one of"):
        warp_pairs(vs.pixels, vs, mode="bicubic")


def test_warp_matches_neighbour_rendering(device, textured_panorama):
    pano = textured_panorama(256, seed=2, max_freq=4.0).float().to(device)
    vs = make_views(pano, "e2p", image_size=128)
    warped, mask = warp_pairs(vs.pixels, vs)
    assert warped.shape == (8, 3, 128, 128) and mask.shape == (8, 128, 128) and mask.dtype == torch.bool
    assert warped.device.type == device.type
    frac = mask.double().mean().item()
    assert 0.45 < frac < 0.5  # about half of view i sees view j
    for p, (i, j) in enumerate(vs.pairs):
        diff = (warped[p] - vs.pixels[i]).abs()[:, mask[p]]
        assert diff.mean() < 0.01 and diff.max() < 0.1, (p, float(diff.mean()))
        assert warped[p][:, ~mask[p]].abs().max() == 0
    # a wrong pairing is far off: the warp really moves content
    assert (warped[0] - vs.pixels[1]).abs()[:, mask[0]].mean() > 0.05


def test_warp_low_resolution_images(direction_panorama):
    """A 14x14 image per view (like a PCA image) warps with the image <-> view pixel mapping."""
    vs = make_views(direction_panorama(256).float(), "anyres_e2p", image_size=S_SMALL, patch_size=8, pitches=(0, 45))
    tokens = F.adaptive_avg_pool2d(vs.pixels, GRID)  # (V, 3, 14, 14), direction-encoded
    pairs = [(1, 2), (9, 10), (2, 10), (1, 0)]
    warped, mask = warp_pairs(tokens, vs, pairs)
    ours = F.normalize(tokens * 2 - 1, dim=1)
    for p, (i, _) in enumerate(pairs):
        got = F.normalize(warped[p] * 2 - 1, dim=0)
        err = _angle_deg(got.permute(1, 2, 0)[mask[p]], ours[i].permute(1, 2, 0)[mask[p]])
        assert mask[p].sum() > 40 and err.mean() < 0.25 * 90 / 14, (p, float(err.mean()))
    nearest, _ = warp_pairs(tokens, vs, pairs, mode="nearest")
    assert torch.isin(nearest[0, 0][mask[0]], tokens[2, 0]).all()  # nearest keeps token values


def test_warp_sliding_window_is_a_shift(textured_panorama):
    vs = make_views(textured_panorama(128).float(), "sliding_window", image_size=64)  # shift of 32 px
    warped, mask = warp_pairs(vs.pixels, vs, [(0, 1), (7, 0)])
    assert mask[:, :, 32:].all() and not mask[:, :, :32].any()
    assert (warped[0, :, :, 32:] - vs.pixels[1, :, :, :32]).abs().max() < 1e-5
    assert (warped[1, :, :, 32:] - vs.pixels[0, :, :, :32]).abs().max() < 1e-5


def test_stitch_reproduces_panorama(device, textured_panorama):
    pano = textured_panorama(128, seed=4, max_freq=4.0).float().to(device)
    vs = make_views(pano, "e2p", image_size=128)
    out, covered = stitch_equirect(vs.pixels, vs, (128, 256))
    assert out.shape == (3, 128, 256) and covered.shape == (128, 256) and out.device.type == device.type
    err = (out - pano).abs()[:, covered]
    assert err.mean() < 0.01 and err.max() < 0.1, float(err.mean())
    assert out[:, ~covered].abs().max() == 0
    assert covered[64].all() and not covered[0].any() and not covered[-1].any()  # equator yes, poles no
    lat = 90 - (torch.arange(128) + 0.5) * 180 / 128
    assert covered[lat.abs() < 42.7].all()  # between two tiles (22.5 deg off-axis) a tile sees +-42.7 deg
    # cube map with 6 faces covers the whole sphere
    vs6 = make_views(pano, "cubemap", image_size=128, faces=6)
    out6, covered6 = stitch_equirect(vs6.pixels, vs6, (128, 256))
    assert covered6.all() and (out6 - pano).abs().mean() < 0.01


def test_stitch_sliding_window_band_and_low_resolution(direction_panorama):
    vs = make_views(direction_panorama(256).float(), "sliding_window", image_size=S_SMALL, patch_size=8)
    out, covered = stitch_equirect(vs.pixels, vs, (64, 128))
    lat = 90 - (torch.arange(64) + 0.5) * 180 / 64
    assert torch.equal(covered.all(dim=1), lat.abs() < 45) and torch.equal(covered.any(dim=1), lat.abs() < 45)
    # token images stitch to the right directions, within a quarter token on average
    tokens = F.adaptive_avg_pool2d(vs.pixels, GRID)
    out, covered = stitch_equirect(tokens, vs, (64, 128))
    expected = direction_panorama(64).float()  # (3, 64, 128)
    got = F.normalize(out * 2 - 1, dim=0).permute(1, 2, 0)[covered]
    err = _angle_deg(got, F.normalize(expected * 2 - 1, dim=0).permute(1, 2, 0)[covered])
    assert err.mean() < 0.25 * 90 / 14, float(err.mean())


def test_stitch_ignores_global_view(textured_panorama):
    pano = textured_panorama(64).float()
    vs = make_views(pano, "anyres_e2p", image_size=64)
    images = vs.pixels.clone()
    images[0] = 1.0  # a global view that would show as white if used
    out, covered = stitch_equirect(images, vs, (64, 128))
    ref, ref_covered = stitch_equirect(vs.pixels[1:], make_views(pano, "e2p", image_size=64), (64, 128))
    assert torch.equal(covered, ref_covered) and (out - ref).abs().max() < 1e-5


# ---- PanoLLaVA's cameras: non-square perspective views, render-size tiles, tall windows -------------
def _panollava_views(pano, revision, strategy, size=S_SMALL, **config):
    from panoviz_callback.panollava.views import panollava_view_settings

    cfg = {"crop_strategy": strategy, "image_size": size, "use_vision_processor": False, **config}
    s = panollava_view_settings(cfg, revision)
    # no 8-bit rounding: the direction-encoding panorama keeps its precision
    return make_views(pano, s["strategy"], s["image_size"], patch_size=8, **{**s["options"], "quantize": False})


PANOLLAVA_CASES = [("head", "e2p"), ("head", "anyres_e2p"), ("head", "sliding_window"), ("dc64bc5", "sliding_window"),
                   ("dc64bc5", "cubemap")]


@pytest.mark.parametrize(("revision", "strategy"), PANOLLAVA_CASES)
def test_panollava_cameras_describe_their_pixels(direction_panorama, revision, strategy):
    """Every pixel's camera ray is the direction its pixel value encodes (rendered through the crop,
    the stretch, the render size and Lanczos / bilinear resizing)."""
    from panoviz_callback.projection import pixel_to_direction

    vs = _panollava_views(direction_panorama(256).float(), revision, strategy)
    s = vs.image_size
    ys, xs = torch.meshgrid(torch.arange(3, s - 3), torch.arange(3, s - 3), indexing="ij")  # clear of edge ringing
    xy = torch.stack([xs, ys], dim=-1).reshape(1, -1, 2).double()
    rays, valid = pixel_to_direction(xy, vs.cameras, s)  # (V, M, 3)
    decoded = F.normalize(vs.pixels.double() * 2 - 1, dim=1)[:, :, ys.reshape(-1), xs.reshape(-1)].transpose(1, 2)
    tiles = [k for k, c in enumerate(vs.cameras) if c.kind != "global"]
    err = _angle_deg(rays[tiles], decoded[tiles])  # (V', M) degrees
    pixel_deg = max(c.vfov_deg or c.fov_deg for c in vs.cameras if c.kind != "global") / s
    assert err.mean() < 0.1 * pixel_deg and err.max() < 0.5 * pixel_deg, (float(err.mean()), float(err.max()))


def test_panollava_e2p_camera_is_the_cropped_render():
    """The stretched crop's camera against rays computed from PanoLLaVA's pipeline in closed form:
    output row y samples render row ``(y + 0.5) (S - 2 cut) / S - 0.5 + cut`` of an S x S view."""
    from panoviz_callback.projection import pixel_to_direction

    vs = _panollava_views(torch.rand(3, 32, 64), "dc64bc5", "e2p", size=224)
    s, cut, t = 224, 11, math.tan(math.radians(45))
    x = torch.arange(s, dtype=torch.float64)
    y_in = (x + 0.5) * (s - 2 * cut) / s - 0.5 + cut
    tx = (t * (2 * x / (s - 1) - 1)).expand(s, s)  # (y, x)
    ty = (t * (1 - 2 * y_in / (s - 1)))[:, None].expand(s, s)
    for cam in vs.cameras:
        yaw = math.radians(cam.yaw_deg)  # rotate the camera-frame ray (tx, ty, 1) about the up axis
        ray = torch.stack([tx * math.cos(yaw) + math.sin(yaw), ty, -tx * math.sin(yaw) + math.cos(yaw)], dim=-1)
        ys, xs = torch.meshgrid(x, x, indexing="ij")
        ours, _ = pixel_to_direction(torch.stack([xs, ys], dim=-1), cam, s)
        assert (ours - F.normalize(ray, dim=-1)).abs().max() < 1e-12


@pytest.mark.parametrize(("revision", "strategy", "pairs", "token_deg"), [
    ("head", "e2p", [(0, 1), (7, 0), (3, 4)], TOKEN_DEG),
    ("head", "anyres_e2p", [(1, 2), (4, 5), (8, 1)], TOKEN_DEG),  # listed 0..135, -180..-45: (8, 1) is -45 -> 0
    ("head", "sliding_window", [(0, 1), (7, 0)], 150 / GRID[0]),
])
def test_panollava_correspondence_against_directions(direction_panorama, revision, strategy, pairs, token_deg):
    vs = _panollava_views(direction_panorama(256).float(), revision, strategy)
    for i, j in pairs:
        idx_i, _ = _check_against_directions(vs, i, j, token_deg)
        assert len(idx_i) > 0
    if strategy == "sliding_window":  # 150 deg tall windows, half a window apart: an exact column shift
        idx_i, idx_j = patch_correspondence(vs, 0, 1, GRID)
        expected = torch.tensor([r * 14 + c for r in range(14) for c in range(7, 14)])
        assert torch.equal(idx_i, expected) and torch.equal(idx_j, expected - 7)


def test_panollava_warp_and_stitch(textured_panorama):
    pano = textured_panorama(256, seed=2, max_freq=4.0).float()
    vs = _panollava_views(pano, "head", "e2p", size=128)
    assert {round(c.vfov_deg, 6) for c in vs.cameras} == {round(math.degrees(2 * math.atan(116 / 128)), 6)}
    warped, mask = warp_pairs(vs.pixels, vs)
    for p, (i, _) in enumerate(vs.pairs):
        diff = (warped[p] - vs.pixels[i]).abs()[:, mask[p]]
        assert mask[p].float().mean() > 0.4 and diff.mean() < 0.01 and diff.max() < 0.1, (p, float(diff.mean()))
    out, covered = stitch_equirect(vs.pixels, vs, (128, 256))
    err = (out - F.interpolate(pano[None], size=(128, 256), mode="area")[0]).abs()[:, covered]
    assert err.mean() < 0.02, float(err.mean())
    lat = 90 - (torch.arange(128) + 0.5) * 180 / 128
    assert covered[lat.abs() < 38].all() and not covered[lat.abs() > 42.2].any()  # tan(vfov / 2) = 116 / 128
    # HEAD's windows cover the band without the polar margins (256 // 12 = 21 rows off each side)
    vw = _panollava_views(pano, "head", "sliding_window", size=128)
    _, covered = stitch_equirect(vw.pixels, vw, (256, 512))
    assert torch.equal(covered.all(dim=1), (torch.arange(256) >= 21) & (torch.arange(256) < 235))


# ---------------------------------------------------------------- exact ties on every grid (independent rays)

_GRIDS = [(224, 7), (224, 14), (256, 16), (336, 24), (384, 27)]


def _ray_partners_perspective(cam_i, cam_j, size: int, g: int) -> tuple[list[int], list[int]]:
    """NumPy float64 from the documented conventions: pixel centres at +-fov/2, R = R_y(yaw) R_x(pitch)."""
    def rot(cam):
        y, p = np.deg2rad(cam.yaw_deg), np.deg2rad(cam.pitch_deg)
        ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
        rx = np.array([[1, 0, 0], [0, np.cos(p), np.sin(p)], [0, -np.sin(p), np.cos(p)]])
        return ry @ rx

    def tans(cam):
        return np.tan(np.deg2rad(cam.fov_deg) / 2), np.tan(np.deg2rad(cam.vfov_deg or cam.fov_deg) / 2)

    c = (np.arange(g) + 0.5) * size / g - 0.5  # view pixel coordinates of the token centres
    x, y = np.meshgrid(c, c, indexing="xy")
    tx_i, ty_i = tans(cam_i)
    rays = np.stack([tx_i * (2 * x / (size - 1) - 1), ty_i * (1 - 2 * y / (size - 1)), np.ones_like(x)], -1)
    world = rays.reshape(-1, 3) @ rot(cam_i).T
    local = world @ rot(cam_j)  # world -> camera j
    tx_j, ty_j = tans(cam_j)
    front = local[:, 2] > 1e-9
    z = np.where(front, local[:, 2], 1.0)
    xj = (local[:, 0] / z / tx_j + 1) * (size - 1) / 2
    yj = (1 - local[:, 1] / z / ty_j) * (size - 1) / 2
    u, v = (xj + 0.5) * g / size + 1e-9, (yj + 0.5) * g / size + 1e-9  # the documented tie rule
    keep = front & (u >= 0) & (u < g) & (v >= 0) & (v < g)
    idx = np.nonzero(keep)[0]
    return idx.tolist(), (np.floor(v[idx]).astype(int) * g + np.floor(u[idx]).astype(int)).tolist()


def _exact_partners_window(cam_i, cam_j, g: int) -> tuple[list[int], list[int]]:
    """Exact rational arithmetic (windows are linear in angle): boundaries are decided exactly."""
    from fractions import Fraction as Fr

    yaw_i, yaw_j, fov_i, fov_j = (Fr(v) for v in (cam_i.yaw_deg, cam_j.yaw_deg, cam_i.fov_deg, cam_j.fov_deg))
    out_i, out_j = [], []
    for r in range(g):
        for c in range(g):
            lon = yaw_i + (Fr(2 * c + 1, 2 * g) - Fr(1, 2)) * fov_i
            dlon = (lon - yaw_j + 180) % 360 - 180
            u = (dlon / fov_j + Fr(1, 2)) * g
            if 0 <= u < g:  # same pitch and vfov: the row is kept
                out_i.append(r * g + c)
                out_j.append(r * g + math.floor(u))
    return out_i, out_j


@pytest.mark.parametrize(("size", "grid"), _GRIDS)
def test_convention_ties_e2p_against_independent_rays(size, grid):
    vs = make_views(torch.rand(3, 64, 128), "e2p", image_size=size)
    for i, j in vs.pairs[:3]:
        idx_i, idx_j = patch_correspondence(vs, i, j, (grid, grid))
        want_i, want_j = _ray_partners_perspective(vs.cameras[i], vs.cameras[j], size, grid)
        assert idx_i.tolist() == want_i and idx_j.tolist() == want_j
    if grid % 2:  # the centre column of view i lands on the edge pixel centre of view j (x = 0): kept
        idx_i, idx_j = patch_correspondence(vs, 1, 0, (grid, grid))
        assert ((idx_j % grid) == grid - 1).any()
        idx_i, idx_j = patch_correspondence(vs, 0, 1, (grid, grid))
        centre = idx_i % grid == grid // 2
        assert centre.sum() >= grid // 2 and ((idx_j[centre] % grid) == 0).all()


@pytest.mark.parametrize(("size", "grid"), _GRIDS)
def test_convention_ties_sliding_window_one_constant_shift(size, grid):
    vs = make_views(torch.rand(3, 512, 1024), "sliding_window", image_size=size)
    shifts = set()
    for i, j in vs.pairs:
        idx_i, idx_j = patch_correspondence(vs, i, j, (grid, grid))
        want_i, want_j = _exact_partners_window(vs.cameras[i], vs.cameras[j], grid)
        assert idx_i.tolist() == want_i and idx_j.tolist() == want_j
        assert torch.equal(idx_i // grid, idx_j // grid)
        shifts |= set((idx_i % grid - idx_j % grid).tolist())
    assert shifts == {grid // 2}  # a shift of grid / 2 tokens; on odd grids x.5 -> the cell above the boundary
