"""Tests of ``labels``: labelled grids for loggers (layout, text present, sizes)."""

from __future__ import annotations

import pytest
import torch

from panoviz_callback import labels
from panoviz_callback.analysis import Analyzer
from panoviz_callback.panorama import synthetic_panorama
from panoviz_callback.views import Camera, make_views

_PATCH = 8


class _PatchEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * _PATCH * _PATCH, 16)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.unfold(pixels, _PATCH, stride=_PATCH).transpose(1, 2))  # (V, N, 16)


class _Queries(torch.nn.Module):
    output_layout = "queries"

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens[:, :5])  # (V, 5, 8): five "queries"


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    views = make_views(synthetic_panorama(64), "e2p", image_size=32, patch_size=_PATCH)
    return Analyzer(metrics=(), normalize=None)(views, _PatchEncoder(), torch.nn.Linear(16, 8))


@pytest.mark.parametrize(("n", "cols"), [(1, 1), (2, 2), (4, 2), (6, 3), (8, 3), (9, 3), (17, 4), (40, 4)])
def test_grid_columns(n, cols):
    assert labels.grid_columns(n) == cols


def test_view_caption_and_stamp():
    assert labels.view_caption(Camera(135.0, -30.0, 90.0, "tile"), 3) == ("View 3", "yaw 135° pitch -30°")
    assert labels.view_caption(Camera(0.0, 0.0, 360.0, "global"), 0) == ("View 0", "global view")
    assert labels.stamp(96, 2) == "step 96 · epoch 2" and labels.stamp(None, 2) == "epoch 2" and labels.stamp(
        None, None) == ""


def test_cardinality_labelled_grid_layout():
    tiles = torch.rand(8, 3, 20, 30)
    out = labels.labelled_grid(tiles, [("a", "b")] * 8, ["title", "sub"], columns=3)
    head = 2 * (16 + 5) + 2 * 4
    cap = 2 * (15 + 5) + 4
    assert out.dtype == torch.uint8 and out.shape == (3, head + 3 * (cap + 20 + 6), 3 * (30 + 6) - 6 + 8)
    # the last tile sits in row 2, column 1, under its caption band
    y, x = head + 2 * (cap + 20 + 6) + cap, 4 + (30 + 6)
    expected = (tiles[7].clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(out[:, y:y + 20, x:x + 30], expected)


def test_text_is_drawn_only_in_the_bands(result):
    plain = labels.pca_image(result, "vision_encoder", step=4, epoch=1, draw_text=False)
    drawn = labels.pca_image(result, "vision_encoder", step=4, epoch=1)
    assert plain.shape == drawn.shape and plain.shape[2] <= 560  # readable in a ~500 px card
    differs = (plain != drawn).any(dim=0)  # (H, W)
    head = 2 * (16 + 5) + 2 * 4
    assert differs[:head].float().mean() > 0.02  # the title
    tile_top = head + 2 * (15 + 5) + 4
    assert not differs[tile_top:tile_top + labels.TILE_PX, 4:4 + labels.TILE_PX].any()  # first tile untouched
    other_step = labels.pca_image(result, "vision_encoder", step=5, epoch=1)
    assert not torch.equal(drawn[:, :head], other_step[:, :head])  # the step is in the title


def test_views_and_panorama_images(result):
    views = labels.views_image(result, step=1, epoch=0)
    assert views.shape[1] > views.shape[2] > 400  # 8 views: a 3 x 3 grid, not a strip
    pano = labels.panorama_image(result, "resampled", step=1, epoch=0)
    assert pano is not None and pano.shape[2] == 512


def test_query_levels_draw_a_matrix():
    views = make_views(synthetic_panorama(64), "e2p", image_size=32, patch_size=_PATCH)
    result = Analyzer(metrics=(), normalize=None)(views, _PatchEncoder(), _Queries())
    image = labels.pca_image(result, "resampled", step=2, epoch=0)
    assert image.shape[0] == 3 and image.shape[2] >= 360
    assert labels.panorama_image(result, "resampled") is None
