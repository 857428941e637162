"""Send one firing of :class:`~panoviz_callback.PanoVizCallback` to every logger of the trainer.

What is logged, at the trainer's global step:

- scalars ``panoviz/{level}/{metric}``, ``level`` in ``("vision_encoder", "resampled")``,
  one per metric the analysis computed (skipped metrics are not logged as numbers), each
  with a one-line description (:func:`scalar_description`);
- images (``(3, H, W)`` uint8, labelled by :mod:`panoviz_callback.labels`: every tile names
  its view, yaw and pitch, every image its level, step and epoch):

  ============================================== =============================================
  ``panoviz/original_views``                     the probe's views (first firing of a fit only)
  ``panoviz/vision_encoder_pca``                 the encoder's PCA-RGB maps, one tile per view
  ``panoviz/resampled_features_pca``             the resampler's PCA-RGB maps (grid) or the
                                                 ``V x Q`` query colour matrix
  ``panoviz/vision_encoder_pca_panorama``        the encoder's maps stitched onto the sphere
  ``panoviz/resampled_pca_panorama``             the same for the resampled features (grid
                                                 layouts only)
  ``panoviz/timeline``                           every metric per level over the firings so far
  ``panoviz/{level}_pca_first_vs_latest``        each view's PCA map at the first firing beside
                                                 the latest, in the same colours
  ============================================== =============================================

Per logger type:

- :class:`~lightning.pytorch.loggers.TensorBoardLogger`: scalars as ``Summary`` values whose
  metadata carries the description (shown in TensorBoard's scalar card tooltip), images as
  ``Summary.Image`` PNGs (what ``add_image`` writes, at zlib level 1: about 4x faster to encode). TensorBoard keeps only 10 images per tag by default (reservoir
  sampling); start it with ``tensorboard --logdir DIR --samples_per_plugin images=100``.
- :class:`~lightning.pytorch.loggers.WandbLogger`: once per run ``define_metric`` for
  ``panoviz/*`` with ``trainer/global_step`` as step metric and a summary per metric
  (``max``, ``min`` for LPIPS), and the descriptions in ``run.config["panoviz_metrics"]``;
  then one ``run.log({...})`` per firing with the images (``wandb.Image`` with a caption
  saying what is shown), the scalars and ``"trainer/global_step"``; no ``step=`` is passed,
  so W&B's own step never goes backwards.
- any other logger: ``log_metrics(scalars, step)``, and the images as PNG files
  ``{log_dir}/panoviz/{name}_step{step:08d}.png`` (written atomically), where ``name`` is
  the tag without ``panoviz/``; loggers without a ``log_dir`` get the scalars only.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor

from panoviz_callback import labels
from panoviz_callback._io import atomic_path

__all__ = ["PREFIX", "IMAGE_TAGS", "STEP_METRIC", "render_images", "image_caption", "scalar_description",
           "log_firing"]

#: The namespace of every tag.
PREFIX = "panoviz"
#: W&B's x-axis for every panoviz chart (the one Lightning's ``WandbLogger`` defines).
STEP_METRIC = "trainer/global_step"
#: Image tags by key.
IMAGE_TAGS = {
    "views": f"{PREFIX}/original_views",
    "vision_encoder": f"{PREFIX}/vision_encoder_pca",
    "resampled": f"{PREFIX}/resampled_features_pca",
    "vision_encoder_panorama": f"{PREFIX}/vision_encoder_pca_panorama",
    "resampled_panorama": f"{PREFIX}/resampled_pca_panorama",
    "timeline": f"{PREFIX}/timeline",
    "vision_encoder_evolution": f"{PREFIX}/vision_encoder_pca_first_vs_latest",
    "resampled_evolution": f"{PREFIX}/resampled_pca_first_vs_latest",
}
_CAPTIONS = {
    "views": "The probe's views (View k: yaw/pitch in degrees); every PCA map is aligned with these.",
    "vision_encoder": "Vision encoder tokens of each view, coloured by a PCA fitted over all views "
                      "(same colour = same feature; black = background).",
    "resampled": "Resampled tokens of each view, coloured by a PCA fitted over all views "
                 "(same colour = same feature; black = background).",
    "vision_encoder_panorama": "Vision encoder PCA maps projected back onto the sphere: seams show where "
                               "overlapping views disagree.",
    "resampled_panorama": "Resampled PCA maps projected back onto the sphere: seams show where overlapping "
                          "views disagree (VICReg should remove them).",
    "timeline": "Every metric per level over the callback's firings.",
    "vision_encoder_evolution": "Vision encoder PCA per view: first firing (left) beside the latest (right), "
                                "same colours.",
    "resampled_evolution": "Resampled PCA per view: first firing (left) beside the latest (right), same colours.",
}
_LOWER_IS_BETTER = ("lpips",)
_described: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def render_images(result: Any, *, with_views: bool, step: int | None = None,
                  epoch: int | None = None) -> dict[str, Tensor]:
    """The labelled images of one firing: ``{tag: (3, H, W) uint8}``.

    Args:
        result: an :class:`~panoviz_callback.analysis.AnalysisResult`.
        with_views: include ``panoviz/original_views``.
        step: the global step drawn into the images.
        epoch: the epoch drawn into the images.
    """
    images: dict[str, Tensor] = {}
    if with_views:
        images[IMAGE_TAGS["views"]] = labels.views_image(result, step=step, epoch=epoch)
    for level in result.levels:
        images[IMAGE_TAGS[level]] = labels.pca_image(result, level, step=step, epoch=epoch)
    for level in result.levels:
        pano = labels.panorama_image(result, level, step=step, epoch=epoch)
        if pano is not None:
            images[IMAGE_TAGS[f"{level}_panorama"]] = pano
    return images


def image_caption(tag: str, step: int | None = None, epoch: int | None = None) -> str:
    """What the image under ``tag`` shows, for W&B captions (``"... (step 96, epoch 2)"``)."""
    key = next((k for k, t in IMAGE_TAGS.items() if t == tag), None)
    text = _CAPTIONS.get(key, tag) if key else tag
    when = labels.stamp(step, epoch).replace(" · ", ", ")
    return f"{text} ({when})" if when else text


def scalar_description(name: str) -> str:
    """A one-line description of the scalar ``"level/metric"`` (or ``"panoviz/level/metric"``)."""
    from panoviz_callback.report import METRIC_DESCRIPTIONS

    level, _, metric = name.removeprefix(f"{PREFIX}/").partition("/")
    if metric == "masked_share":
        return (f"share of the {labels.LEVEL_TITLES.get(level, level)} tokens the PCA left out (background, "
                "padding or outliers), mean over the probe's views.")
    what = METRIC_DESCRIPTIONS.get(metric, metric)
    direction = "lower = more similar" if metric in _LOWER_IS_BETTER else "higher = more similar"
    return (f"{what}; {labels.LEVEL_TITLES.get(level, level)} tokens of the probe's views, mean over adjacent "
            f"view pairs ({direction}).")


def log_firing(loggers: Sequence[Logger], scalars: Mapping[str, float], images: Mapping[str, Tensor], step: int,
               epoch: int | None = None) -> None:
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
                _log_wandb(logger, tagged, images, step, epoch)
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
    described = _described.setdefault(writer, set())
    for tag, value in scalars.items():
        if tag in described or not hasattr(writer, "_get_file_writer"):
            writer.add_scalar(tag, value, global_step=step)
            continue
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

        metadata = SummaryMetadata(display_name=tag, summary_description=scalar_description(tag))
        metadata.plugin_data.plugin_name = "scalars"
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value, metadata=metadata)])
        writer._get_file_writer().add_summary(summary, step)
        described.add(tag)
    for tag, image in images.items():
        if hasattr(writer, "_get_file_writer"):  # PNG at zlib level 1: ~4x faster than add_image's default
            from tensorboard.compat.proto.summary_pb2 import Summary

            encoded = Summary.Image(height=int(image.shape[1]), width=int(image.shape[2]), colorspace=3,
                                    encoded_image_string=_png_bytes(image))
            writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=encoded)]), step)
        else:
            writer.add_image(tag, image.numpy(), global_step=step, dataformats="CHW")


def _log_wandb(logger: WandbLogger, scalars: Mapping[str, float], images: Mapping[str, Tensor], step: int,
               epoch: int | None) -> None:
    import wandb

    run = logger.experiment
    described = _described.setdefault(run, set())
    new = [tag for tag in scalars if tag not in described]
    if new and hasattr(run, "define_metric"):
        if not described:
            run.define_metric(STEP_METRIC)
        for tag in new:
            summary = "min" if tag.rsplit("/", 1)[-1] in _LOWER_IS_BETTER else "max"
            run.define_metric(tag, step_metric=STEP_METRIC, summary=f"{summary},last")
        described.update(new)
        run.config.update({"panoviz_metrics": {tag: scalar_description(tag) for tag in sorted(described)}},
                          allow_val_change=True)
    payload: dict[str, Any] = {tag: wandb.Image(_hwc(image), caption=image_caption(tag, step, epoch))
                               for tag, image in images.items()}
    payload.update(scalars)
    payload[STEP_METRIC] = step
    run.log(payload)


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


def _png_bytes(image: Tensor) -> bytes:
    """A ``(3, H, W)`` uint8 image as PNG bytes, fast compression (level 1)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_hwc(image)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _hwc(image: Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())
