"""Send one firing of :class:`~panoviz_callback.PanoVizCallback` to every logger of the trainer.

What is logged, at the trainer's global step:

- scalars ``panoviz/{level}/{metric}``, ``level`` in ``("vision_encoder", "resampled")``,
  one per metric the analysis computed (skipped metrics are not logged as numbers);
- images (``(3, H, W)`` uint8, composed by :mod:`panoviz_callback.render`):

  ============================== ==========================================================
  ``panoviz/original_views``     the probe's views in a row (first firing of a fit only:
                                 they never change)
  ``panoviz/vision_encoder_pca`` the encoder's PCA-RGB maps, aligned with the views
  ``panoviz/resampled_features_pca`` the resampler's PCA-RGB maps (grid) or query matrix
  ``panoviz/pca_panorama``       the stitched PCA panoramas, one row per level that has a
                                 token grid: the vision encoder on top, the resampled
                                 features below (a query-token resampler has no row)
  ============================== ==========================================================

Per logger type:

- :class:`~lightning.pytorch.loggers.TensorBoardLogger`: ``SummaryWriter.add_scalar`` and
  ``add_image`` (CHW). TensorBoard keeps only 10 images per tag by default (reservoir
  sampling); start it with ``tensorboard --logdir DIR --samples_per_plugin images=100``
  to see every firing.
- :class:`~lightning.pytorch.loggers.WandbLogger`: one ``run.log({...})`` per firing with
  the images (``wandb.Image``), the scalars and ``"trainer/global_step"`` (the x-axis
  Lightning defines); no ``step=`` is passed, so W&B's own step never goes backwards.
- any other logger: ``log_metrics(scalars, step)``, and the images as PNG files
  ``{log_dir}/panoviz/{name}_step{step:08d}.png`` (written atomically), where ``name`` is
  the tag without ``panoviz/``; loggers without a ``log_dir`` get the scalars only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor

from panoviz_callback import render
from panoviz_callback._io import atomic_path

__all__ = ["PREFIX", "IMAGE_TAGS", "render_images", "log_firing"]

#: The namespace of every tag.
PREFIX = "panoviz"
#: Image tags: ``{"views" | "vision_encoder" | "resampled" | "panorama": tag}``.
IMAGE_TAGS = {
    "views": f"{PREFIX}/original_views",
    "vision_encoder": f"{PREFIX}/vision_encoder_pca",
    "resampled": f"{PREFIX}/resampled_features_pca",
    "panorama": f"{PREFIX}/pca_panorama",
}
_GAP = 4


def render_images(result: Any, *, with_views: bool) -> dict[str, Tensor]:
    """The images of one firing: ``{tag: (3, H, W) uint8}``.

    Args:
        result: an :class:`~panoviz_callback.analysis.AnalysisResult`.
        with_views: include ``panoviz/original_views``.
    """
    images: dict[str, Tensor] = {}
    if with_views:
        images[IMAGE_TAGS["views"]] = render.views_grid_image(result)
    for level in result.levels:
        images[IMAGE_TAGS[level]] = render.pca_grid_image(result, level)
    panoramas = [p for p in (render.pca_panorama_image(result, level) for level in result.levels) if p is not None]
    if panoramas:
        images[IMAGE_TAGS["panorama"]] = _stack_rows(panoramas)
    return images


def _stack_rows(images: Sequence[Tensor]) -> Tensor:
    """Stack ``(3, h, w)`` uint8 images of equal width vertically, separated by white rows."""
    gap = torch.full((3, _GAP, images[0].shape[2]), 255, dtype=torch.uint8)
    parts: list[Tensor] = []
    for k, image in enumerate(images):
        parts += ([gap] if k else []) + [image]
    return torch.cat(parts, dim=1)  # (3, H, w)


def log_firing(loggers: Sequence[Logger], scalars: Mapping[str, float], images: Mapping[str, Tensor], step: int) -> None:
    """Log ``scalars`` (``{"level/metric": value}``) and ``images`` (``{tag: (3, H, W) uint8}``) to every logger.

    Every logger is tried even when one fails; the first error is raised afterwards
    with the logger's class name, so the callback can report it.

    Raises:
        RuntimeError: a logger failed (the original error is chained).
    """
    tagged = {f"{PREFIX}/{name}": float(value) for name, value in scalars.items()}
    errors: list[tuple[Logger, Exception]] = []
    for logger in loggers:
        try:
            if isinstance(logger, TensorBoardLogger):
                _log_tensorboard(logger, tagged, images, step)
            elif isinstance(logger, WandbLogger):
                _log_wandb(logger, tagged, images, step)
            else:
                _log_generic(logger, tagged, images, step)
        except Exception as err:  # noqa: BLE001 - every logger gets its turn, the first error is re-raised
            errors.append((logger, err))
    if errors:
        logger, err = errors[0]
        raise RuntimeError(f"logging to {type(logger).__name__} failed: {type(err).__name__}: {err}") from err


def _log_tensorboard(logger: TensorBoardLogger, scalars: Mapping[str, float], images: Mapping[str, Tensor],
                     step: int) -> None:
    writer = logger.experiment
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, global_step=step)
    for tag, image in images.items():
        writer.add_image(tag, image.numpy(), global_step=step, dataformats="CHW")


def _log_wandb(logger: WandbLogger, scalars: Mapping[str, float], images: Mapping[str, Tensor], step: int) -> None:
    import wandb

    payload: dict[str, Any] = {tag: wandb.Image(_hwc(image), caption=f"step {step}") for tag, image in images.items()}
    payload.update(scalars)
    payload["trainer/global_step"] = step
    logger.experiment.log(payload)


def _log_generic(logger: Logger, scalars: Mapping[str, float], images: Mapping[str, Tensor], step: int) -> None:
    logger.log_metrics(dict(scalars), step=step)
    log_dir = getattr(logger, "log_dir", None)
    if not images or log_dir is None:
        return
    out = Path(log_dir) / PREFIX
    out.mkdir(parents=True, exist_ok=True)
    for tag, image in images.items():
        _write_png(image, out / f"{tag.split('/', 1)[1]}_step{step:08d}.png")


def _write_png(image: Tensor, path: str | Path) -> Path:
    """Write a ``(3, H, W)`` uint8 image as PNG through a temporary file and ``os.replace``."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(_hwc(image)).save(tmp, format="PNG")
    return path


def _hwc(image: Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())
