"""Tests of ``timeline``: metric timelines, first-vs-latest PCA images, checkpoint series and GIFs."""

from __future__ import annotations

import os
import time

import pytest
import torch
from PIL import Image

from panoviz_callback import timeline
from panoviz_callback.analysis import Analyzer
from panoviz_callback.panorama import synthetic_panorama
from panoviz_callback.views import make_views

_HISTORY = [
    {"step": 10, "epoch": 0, "scalars": {"vision_encoder/token_cosine": 0.5, "resampled/token_cosine": 0.6,
                                         "resampled/lpips": 0.3}},
    {"step": 20, "epoch": 1, "scalars": {"vision_encoder/token_cosine": 0.5, "resampled/token_cosine": 0.7,
                                         "resampled/lpips": float("nan")}},
    {"step": 30, "epoch": 2, "scalars": {"vision_encoder/token_cosine": 0.5, "resampled/token_cosine": 0.8,
                                         "resampled/lpips": 0.2}},
]


def test_series_and_plot_points():
    series = timeline.timeline_series(_HISTORY)
    assert list(series) == [("vision_encoder", "token_cosine"), ("resampled", "token_cosine"), ("resampled", "lpips")]
    assert series[("resampled", "token_cosine")] == ([10, 20, 30], [0.6, 0.7, 0.8])
    assert series[("resampled", "lpips")] == ([10, 30], [0.3, 0.2])  # NaN left out
    fig, axes = timeline.plot_timeline(_HISTORY)
    assert list(axes) == ["token_cosine", "lpips"]
    lines = {line.get_label(): line for line in axes["token_cosine"].get_lines()}
    assert list(lines) == ["vision encoder", "resampled"]
    assert list(lines["resampled"].get_ydata()) == [0.6, 0.7, 0.8]
    assert "3 firing(s), steps 10-30 (last: epoch 2)" in fig._suptitle.get_text()


def test_timeline_image_and_file(tmp_path):
    image = timeline.timeline_image(_HISTORY)
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.shape[2] <= 720  # two panels per metric row
    series = timeline.timeline_series(_HISTORY)
    points = timeline.chart_points(series, ["token_cosine", "lpips"], origin=(4, 2 * (15 + 5) + 8))
    assert [len(points[key]) for key in series] == [3, 3, 2]  # one marker per firing that computed the metric
    (x0, y0), (x1, y1), (x2, y2) = points[("resampled", "token_cosine")]
    assert x0 < x1 < x2 and y0 > y1 > y2  # later steps to the right, higher values up
    for x, y in points[("resampled", "token_cosine")]:  # a resampled (orange) marker is drawn at each point
        assert tuple(image[:, round(y), round(x)].tolist()) == (255, 127, 14)
    plain = timeline.timeline_image(_HISTORY, draw_text=False)
    assert (plain != image).any() and plain.shape == image.shape
    path = timeline.write_timeline(_HISTORY, tmp_path / "t.png")
    with Image.open(path) as png:
        assert png.width > 300 and png.height > 200
    empty = timeline.timeline_image([])
    assert empty.shape[0] == 3


def test_first_vs_latest_same_colours():
    torch.manual_seed(0)
    views = make_views(synthetic_panorama(64), "e2p", image_size=32, patch_size=8)
    class Patch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3 * 64, 16)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.proj(torch.nn.functional.unfold(pixels, 8, stride=8).transpose(1, 2))

    encoder = Patch()
    analyzer = Analyzer(metrics=(), normalize=None)
    result = analyzer(views, encoder)
    tokens = timeline.grid_tokens(result.levels["vision_encoder"].features)
    settings = analyzer.settings()
    image = timeline.first_vs_latest_image(tokens.clone(), result, "vision_encoder", settings, first=(1, 0),
                                           latest=(9, 4), draw_text=False)
    assert image is not None and image.dtype == torch.uint8
    # identical tokens on both sides: each view's left half equals its right half (one basis, one colour range)
    head = 2 * (16 + 5) + 8
    top = head + 2 * (15 + 5) + 4
    left = image[:, top:top + 80, 4:84]
    right = image[:, top:top + 80, 88:168]
    assert torch.equal(left, right) and left.float().std() > 0
    assert timeline.first_vs_latest_image(tokens[:, :3], result, "vision_encoder", settings, first=(1, 0),
                                          latest=(9, 4)) is None  # another token layout: nothing to compare


def test_checkpoint_series_order(tmp_path):
    names = ["last.ckpt", "epoch=10-step=110.ckpt", "epoch=2-step=22.ckpt", "epoch=0-step=0.ckpt"]
    for k, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (time.time() - k, time.time() - k))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    assert [p.name for p in timeline.checkpoint_series(tmp_path)] == [
        "epoch=0-step=0.ckpt", "epoch=2-step=22.ckpt", "epoch=10-step=110.ckpt", "last.ckpt"]
    with pytest.raises(ValueError, match="holds no .ckpt files"):
        timeline.checkpoint_series(tmp_path / "empty")


def test_history_from_reports_one_entry_per_step():
    def report(step, value):
        return {"step": step, "epoch": step // 10, "levels": {"resampled": {"metrics": {
            "overlap_cosine": {"mean": value}, "ssim": {"skipped": "no"}}}}}

    history = timeline.history_from_reports([report(20, 0.7), report(10, 0.6), report(20, 0.7)])
    assert history == [{"step": 10, "epoch": 1, "scalars": {"resampled/overlap_cosine": 0.6}},
                       {"step": 20, "epoch": 2, "scalars": {"resampled/overlap_cosine": 0.7}}]


def test_write_gif(tmp_path):
    frames = []
    for k, size in enumerate([(40, 30), (50, 20)]):
        frames.append(tmp_path / f"f{k}.png")
        Image.new("RGB", size, (40 * k, 0, 0)).save(frames[-1])
    gif = timeline.write_gif(frames, tmp_path / "a.gif")
    with Image.open(gif) as im:
        assert im.n_frames == 2 and im.size == (50, 30)
    assert timeline.write_gif(frames[:1], tmp_path / "b.gif") is None
