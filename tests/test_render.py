import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from panoviz_callback import render
from panoviz_callback.analysis import analyze
from panoviz_callback.panorama import synthetic_panorama
from panoviz_callback.views import make_views


class _Tokens(nn.Module):
    """A cheap encoder: 16 x 16 patch means through a fixed random projection (a 4 x 4 grid at 64 px)."""

    patch_size = 16

    def __init__(self, dim=24):
        super().__init__()
        self.proj = nn.Linear(3, dim)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        patches = nn.functional.avg_pool2d(x, 16).flatten(2).transpose(1, 2)  # (V, N, 3)
        return torch.tanh(self.proj(patches * 4 - 2))


class _Queries(nn.Module):
    num_queries = 5

    def forward(self, x):
        return x[:, :5] * 2


@pytest.fixture(scope="module")
def pano():
    return synthetic_panorama(128)


@pytest.fixture(scope="module")
def anyres(pano):
    views = make_views(pano, "anyres_e2p", image_size=64)
    return analyze(views, _Tokens(), nn.Linear(24, 8), metrics=["token_cosine"], bg_removal="none")


@pytest.fixture(scope="module")
def queries(pano):
    views = make_views(pano, "cubemap", image_size=64)
    return analyze(views, _Tokens(), _Queries(), metrics=["token_cosine"], bg_removal="none")


def test_convention_display_order_and_titles(anyres):
    views = anyres.views
    assert views.cameras[0].kind == "global"
    assert render.display_order(views) == list(range(len(views)))
    assert render.view_title(views.cameras[2]) == "yaw 45° pitch 0°"
    assert render.view_title(views.cameras[0]) == "global view"

    class _Cams:
        cameras = [type("C", (), {"kind": k})() for k in ("tile", "global", "tile")]

    assert render.display_order(_Cams()) == [1, 0, 2]


def test_upsample_pca_nearest_keeps_token_blocks():
    images = torch.rand(2, 3, 4, 4)
    up = render.upsample_pca(images, 64)
    assert up.shape == (2, 3, 64, 64)
    assert torch.equal(up[:, :, ::16, ::16], images)
    assert torch.equal(up[:, :, 15::16, 15::16], images)
    smooth = render.upsample_pca(images, (32, 48), "bilinear")
    assert smooth.shape == (2, 3, 32, 48) and 0 <= float(smooth.min()) <= float(smooth.max()) <= 1
    with pytest.raises(ValueError, match=r"Argument `upsample` must be one of \('nearest', 'bilinear'\)"):
        render.upsample_pca(images, 64, "bicubic")


def test_cardinality_logged_images(anyres, queries):
    n = len(anyres.views)
    views_img = render.views_grid_image(anyres)
    assert views_img.dtype == torch.uint8 and views_img.shape == (3, 64, n * 64 + (n - 1) * 4)
    pca = render.pca_grid_image(anyres, "vision_encoder")
    assert pca.shape == views_img.shape  # aligned under the views
    stacked = render.pca_grid_image(anyres, "resampled", with_views=True)
    assert stacked.shape == (3, 64 + 4 + 64, views_img.shape[2])
    assert torch.equal(stacked[:, :64], views_img)
    full = render.pca_panorama_image(anyres, "vision_encoder", out_hw=(64, 128), crop=False)
    assert full.dtype == torch.uint8 and full.shape == (3, 64, 128)
    # pitch-0 tiles of 90 deg leave the poles unseen: dark grey there, and cropped away by default
    assert torch.all(full[:, 0] == round(0.25 * 255))
    pano = render.pca_panorama_image(anyres, "vision_encoder", out_hw=(64, 128))
    assert pano.shape[0] == 3 and 32 <= pano.shape[1] < 40 and pano.shape[2] == 128
    assert pano.shape == render.pca_panorama_image(anyres, "resampled", out_hw=(64, 128)).shape
    # query tokens: a V x Q matrix of colour cells, no panorama
    matrix = render.pca_grid_image(queries, "resampled")
    cell = matrix.shape[1] // 4
    assert matrix.shape == (3, 4 * cell, 5 * cell)
    assert render.pca_panorama_image(queries, "resampled") is None
    assert render.pca_panorama_image(queries, "vision_encoder", out_hw=(32, 64), crop=False).shape == (3, 32, 64)
    with pytest.raises(ValueError, match=r"Argument `level` must be one of \('vision_encoder', 'resampled'\)"):
        render.pca_grid_image(anyres, "encoder")


def test_wide_view_sets_stay_within_2400_px(pano):
    views = make_views(pano, "e2p", image_size=224, num_views=16)
    result = analyze(views, _Tokens(), metrics=(), bg_removal="none")
    assert render.views_grid_image(result).shape[2] <= 2400
    assert render.pca_grid_image(result, "vision_encoder").shape[2] <= 2400


def test_plot_functions_take_ax(anyres, queries):
    fig = Figure()
    ax = fig.add_subplot()
    out_fig, out_ax = render.plot_views(anyres.views, ax)
    assert out_fig is fig and out_ax is ax
    titles = [t.get_text() for t in ax.texts]
    assert titles[:2] == ["View 0\nglobal view", "View 1\nyaw 0° pitch 0°"]
    fig2, ax2 = render.plot_pca_panorama(anyres, "vision_encoder", out_hw=(32, 64))
    assert isinstance(fig2, Figure) and ax2.figure is fig2
    _, ax3 = render.plot_pca_maps(queries, "resampled")
    assert [t.get_text() for t in ax3.get_yticklabels()] == ["View 0", "View 1", "View 2", "View 3"]
    _, ax4 = render.plot_pca_panorama(queries, "resampled")
    assert "query tokens have no spatial position" in ax4.texts[0].get_text()


def _png_size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_write_figures(tmp_path, anyres, queries):
    written = render.write_figures(anyres, tmp_path, "run", pano_hw=(64, 128))
    assert {p.name for p in written.values()} == {
        "original_views_run.png", "vision_encoder_pca_run.png", "resampled_features_pca_run.png"}
    for path in written.values():
        width, height = _png_size(path)
        assert 200 <= width <= 2400 and 100 <= height <= 2400, path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written.values())  # no temp files
    # query layouts and no resampler
    out = render.write_figures(queries, tmp_path / "q", "q", pano_hw=(64, 128))
    assert _png_size(out["resampled"])[0] <= 2400
    no_res = analyze(queries.views, _Tokens(), metrics=(), bg_removal="none")
    assert set(render.write_figures(no_res, tmp_path / "n", "n", pano_hw=(64, 128))) == {"views", "vision_encoder"}


def test_save_figure_atomic_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    fig = Figure()
    fig.add_subplot().plot([0, 1])

    def broken(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        render.save_figure_atomic(fig, target)
    assert target.read_bytes() == b"old"  # the previous file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]  # and no temporary file is left
    monkeypatch.undo()
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    render.save_figure_atomic(fig, target)
    assert _png_size(target)[0] > 0


def test_exception_bad_name(tmp_path, anyres):
    with pytest.raises(ValueError, match="Argument `name` must be a non-empty file name"):
        render.write_figures(anyres, tmp_path, "a/b")
