"""Tests of ``sinks``: what one firing sends to TensorBoard, W&B and any other logger."""

from __future__ import annotations

import csv
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from panoviz_callback import sinks
from panoviz_callback.analysis import Analyzer
from panoviz_callback.panorama import synthetic_panorama
from panoviz_callback.views import make_views

_PATCH = 8


class _PatchEncoder(torch.nn.Module):
    """Pixels ``(V, 3, S, S)`` -> ``(V, (S/8)^2, 16)``: a fixed random projection of 8x8 patches."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * _PATCH * _PATCH, 16)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = torch.nn.functional.unfold(pixels, _PATCH, stride=_PATCH)  # (V, 3*8*8, N)
        return self.proj(patches.transpose(1, 2))  # (V, N, 16)


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    views = make_views(synthetic_panorama(64), "anyres_e2p", image_size=32, patch_size=_PATCH)
    resampler = torch.nn.Linear(16, 8)
    return Analyzer(metrics=["token_cosine", "overlap_cosine"], normalize=None)(views, _PatchEncoder(), resampler)


def test_smoke_render_images(result):
    images = sinks.render_images(result, with_views=True, step=3, epoch=0)
    per_firing = ("views", "vision_encoder", "resampled", "vision_encoder_panorama", "resampled_panorama")
    assert set(images) == {sinks.IMAGE_TAGS[key] for key in per_firing}
    for image in images.values():
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    assert sinks.IMAGE_TAGS["views"] not in sinks.render_images(result, with_views=False)


def test_cardinality_one_pca_panorama_per_grid_level(result):
    from panoviz_callback.render import pca_panorama_image

    images = sinks.render_images(result, with_views=False)
    for level in ("vision_encoder", "resampled"):
        labelled = images[sinks.IMAGE_TAGS[f"{level}_panorama"]]
        plain = pca_panorama_image(result, level)
        assert labelled.shape[2] == plain.shape[2] and labelled.shape[1] > plain.shape[1]  # plus title and indices
        rows = [r for r in range(labelled.shape[1] - plain.shape[1] + 1)
                if torch.equal(labelled[:, r:r + plain.shape[1]], plain)]
        assert len(rows) == 1, level  # the panorama itself is untouched under its labels


def test_captions_and_descriptions():
    caption = sinks.image_caption(sinks.IMAGE_TAGS["resampled_panorama"], step=96, epoch=2)
    assert caption.startswith("Resampled PCA maps projected back onto the sphere") and caption.endswith(
        "(step 96, epoch 2)")
    assert sinks.image_caption("panoviz/other") == "panoviz/other"
    description = sinks.scalar_description("panoviz/vision_encoder/lpips")
    assert "LPIPS" in description and "vision encoder" in description and "lower = more similar" in description


def test_tensorboard(tmp_path, result):
    logger = TensorBoardLogger(tmp_path, name="tb")
    images = sinks.render_images(result, with_views=True)
    sinks.log_firing([logger], result.scalars(), images, step=7)
    sinks.log_firing([logger], result.scalars(), {}, step=9)
    logger.finalize("success")
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == set(images)
    expected = {f"panoviz/{name}" for name in result.scalars()}
    assert set(acc.Tags()["scalars"]) == expected
    assert [e.step for e in acc.Scalars("panoviz/resampled/overlap_cosine")] == [7, 9]
    value = acc.Scalars("panoviz/vision_encoder/token_cosine")[0].value
    assert value == pytest.approx(result.scalars()["vision_encoder/token_cosine"], abs=1e-6)
    image = acc.Images("panoviz/original_views")[0]
    h, w = images["panoviz/original_views"].shape[1:]
    assert (image.step, image.height, image.width) == (7, h, w)


class _FakeRun:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def log(self, data: dict[str, Any], **kwargs: Any) -> None:
        self.calls.append((data, kwargs))


def test_wandb_one_log_call_per_firing(tmp_path, result):
    pytest.importorskip("wandb")
    import wandb

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    logger._experiment = run = _FakeRun()  # the payload is what matters; the real run is tested end to end
    images = sinks.render_images(result, with_views=True)
    sinks.log_firing([logger], result.scalars(), images, step=5)
    assert len(run.calls) == 1
    data, kwargs = run.calls[0]
    assert kwargs == {}  # no step=: W&B's own step never goes backwards
    assert data["trainer/global_step"] == 5
    assert all(isinstance(data[tag], wandb.Image) for tag in images)
    assert data["panoviz/original_views"]._caption == sinks.image_caption("panoviz/original_views", 5)
    assert {f"panoviz/{k}" for k in result.scalars()} <= set(data)


def test_generic_logger_metrics_and_pngs(tmp_path, result):
    logger = CSVLogger(tmp_path, name="csv")
    images = sinks.render_images(result, with_views=True)
    sinks.log_firing([logger], result.scalars(), images, step=3)
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert int(row["step"]) == 3
    assert float(row["panoviz/resampled/token_cosine"]) == pytest.approx(result.scalars()["resampled/token_cosine"])
    pngs = sorted(p.name for p in (tmp_path / "csv" / "version_0" / "panoviz").iterdir())
    assert pngs == sorted(f"{tag.split('/', 1)[1]}_step00000003.png" for tag in images)
    png = Image.open(tmp_path / "csv" / "version_0" / "panoviz" / "resampled_pca_panorama_step00000003.png")
    assert png.size[::-1] == tuple(images["panoviz/resampled_pca_panorama"].shape[1:])


class _BrokenLogger(Logger):
    name = "broken"
    version = 0

    def log_metrics(self, metrics, step=None):
        raise OSError("disk full")

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_exception_one_bad_logger_does_not_starve_the_others(tmp_path, result):
    good = CSVLogger(tmp_path, name="csv")
    with pytest.raises(RuntimeError, match=r"logging to _BrokenLogger failed: OSError: disk full"):
        sinks.log_firing([_BrokenLogger(), good], result.scalars(), {}, step=1)
    good.save()
    assert "panoviz/vision_encoder/token_cosine" in (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
