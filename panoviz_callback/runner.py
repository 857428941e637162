"""The checkpoint runner: one model, many panoramas, the analysis core's files for each.

:func:`plan_run` merges the command-line options with what the checkpoint says (the
:class:`~panoviz_callback.PanoVizCallback` settings first, then the module's and data
module's crop geometry); :class:`Runner` loads each panorama, cuts it into views, runs the
same :class:`~panoviz_callback.analysis.Analyzer` as the callback and writes
``original_views_NAME.png``, ``vision_encoder_pca_NAME.png``,
``resampled_features_pca_NAME.png``, ``similarity_analysis_NAME.txt`` and
``similarity_NAME.json``. An image that fails is reported and skipped and leaves no file
behind (its files are written in a temporary folder and moved in place at the end).

Colours: every panorama starts from the same PCA state, so results never depend on the
order of the images. With a callback checkpoint whose PCA settings are unchanged that
state is the saved one: other panoramas align their colours to it, and the callback's own
probe reuses it frozen (same basis, same colour range), which reproduces the live images
and metrics of the last firing exactly.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from panoviz_callback.inputs import (  # noqa: F401 - re-exported: the runner's public inputs
    ImageSource,
    UsageError,
    _safe_name,
    callback_probe,
    check_output_dir,
    image_names,
    resolve_device,
    resolve_images,
)
from panoviz_callback.panorama import IMAGE_SUFFIXES  # noqa: F401 - re-exported
from panoviz_callback.summary import _skipped_lines, format_summary, live_agreement  # noqa: F401

__all__ = [
    "UsageError", "ImageSource", "RunPlan", "ImageResult", "Runner", "resolve_images", "callback_probe",
    "check_output_dir", "resolve_device", "plan_run", "format_summary", "live_agreement", "image_names",
    "clean_stale_staging",
]

#: Panorama files are downscaled on load to at most this width (the callback's probe rule).
MAX_WIDTH = 2048
#: Smallest panorama accepted, ``(W, H)`` in pixels.
MIN_SIZE = (64, 32)
_PCA_SETTINGS = ("layer", "keep_cls_token", "n_components", "bg_removal", "bg_threshold", "normalize")
_ANALYZER_SETTINGS = (*_PCA_SETTINGS, "metrics", "inside")
_STAGE_PREFIX = ".panoviz-"
Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------- planning
@dataclass
class RunPlan:
    """How every panorama is cut and analysed.

    Attributes:
        crop_strategy: the ``make_views`` strategy.
        image_size: view size ``S``.
        crop_options: ``make_views`` options.
        analysis: keyword arguments of :class:`~panoviz_callback.analysis.Analyzer`.
        pca_states: the saved PCA states every panorama starts from (``{level: state dict}``).
        freeze_probe: reuse those states frozen for the callback's probe (exact reproduction).
        reproduces: the settings are the callback's own (the probe run repeats the live analysis).
        notes: what was taken from where, for the user.
    """

    crop_strategy: str
    image_size: int
    crop_options: dict[str, Any]
    analysis: dict[str, Any]
    pca_states: dict[str, Any] = field(default_factory=dict)
    freeze_probe: bool = False
    reproduces: bool = False
    notes: list[str] = field(default_factory=list)


def plan_run(options: Mapping[str, Any], callback: Mapping[str, Any] | None,
             geometry: Mapping[str, Any] | None = None) -> RunPlan:
    """Merge command-line ``options`` (None = not given) with the callback's settings and the geometry.

    Args:
        options: ``crop_strategy``, ``fov``, ``overlap``, ``image_size``, ``layer``, ``n_components``,
            ``keep_cls_token``, ``bg_removal``, ``bg_threshold``, ``no_similarity``, ``inside`` (a dict of
            :class:`~panoviz_callback.inside.InsideOptions` fields, merged over the callback's).
        callback: the :class:`~panoviz_callback.PanoVizCallback` state (None: none).
        geometry: ``crop_strategy`` / ``image_size`` / ``crop_options`` from the checkpoint or config.

    Raises:
        UsageError: an option is out of range or does not apply to the crop strategy.
    """
    from panoviz_callback.analysis import Analyzer
    from panoviz_callback.views import STRATEGY_OPTIONS, make_views

    saved = dict((callback or {}).get("settings") or {})
    geometry = dict(geometry or {})
    base = saved if callback else geometry
    base_strategy = base.get("crop_strategy") or geometry.get("crop_strategy") or "e2p"
    strategy = options.get("crop_strategy") or base_strategy
    if strategy not in STRATEGY_OPTIONS:
        raise UsageError(f"the checkpoint's crop strategy {strategy!r} is not supported; pass --crop_strategy "
                         f"{{{','.join(STRATEGY_OPTIONS)}}}")
    crop = {k: v for k, v in dict(base.get("crop_options") or {}).items() if k in STRATEGY_OPTIONS[strategy]}
    if strategy != base_strategy:
        crop = {k: v for k, v in crop.items() if k in ("fov_deg", "overlap", "patch_size")}
    for flag, key in (("fov", "fov_deg"), ("overlap", "overlap")):
        if options.get(flag) is not None:
            if key not in STRATEGY_OPTIONS[strategy]:
                raise UsageError(f"--{flag} does not apply to --crop_strategy {strategy}")
            crop[key] = float(options[flag])
            crop.pop("num_views", None)  # derived from fov and overlap
            crop.pop("yaws", None)
    image_size = options.get("image_size") or base.get("image_size") or geometry.get("image_size") or 224
    _check_file_values(int(image_size) if isinstance(image_size, int | float) else image_size, crop, saved)
    try:
        make_views(torch.zeros(3, 8, 16), strategy, int(image_size), **crop)
    except (ValueError, TypeError) as err:
        raise UsageError(f"invalid crop settings ({strategy}, image size {image_size}, {crop}): {err}") from None

    analysis = {k: saved[k] for k in _ANALYZER_SETTINGS if k in saved}
    for key in ("layer", "n_components", "bg_removal", "bg_threshold", "keep_cls_token"):
        if options.get(key) is not None:
            analysis[key] = options[key]
    if options.get("no_similarity"):
        analysis["metrics"] = ()
    if options.get("inside"):
        analysis["inside"] = {**dict(analysis.get("inside") or {}), **options["inside"]}
    try:
        Analyzer(**analysis)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None

    same_pca = bool(callback) and all(analysis.get(k, _default(k)) == saved.get(k, _default(k))
                                      for k in _PCA_SETTINGS)
    same_views = bool(callback) and strategy == saved.get("crop_strategy") and int(image_size) == saved.get(
        "image_size") and crop == dict(saved.get("crop_options") or {})
    plan = RunPlan(crop_strategy=strategy, image_size=int(image_size), crop_options=crop, analysis=analysis)
    if callback and same_pca:
        plan.pca_states = dict(callback.get("pca_states") or {})
        plan.freeze_probe = same_views
    plan.reproduces = same_pca and same_views and analysis.get("metrics") == saved.get("metrics")
    return plan


def _check_file_values(image_size: Any, crop: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Sizes that come from the checkpoint are capped before anything is allocated."""
    from panoviz_callback.checkpoint import ModelSpecError, check_limit

    try:
        check_limit(image_size, "image_size", "view size")
        for key in ("num_views", "fov_deg", "tile_render_size"):
            if crop.get(key) is not None:
                check_limit(crop[key], key, f"crop option {key}")
        if saved.get("layer") is not None:
            check_limit(saved["layer"], "layer", "the checkpoint's layer index")
        if saved.get("n_components") is not None:
            check_limit(saved["n_components"], "n_components", "the checkpoint's n_components")
    except ModelSpecError as err:
        raise UsageError(str(err)) from None


def _default(key: str) -> Any:
    return {"layer": -1, "keep_cls_token": False, "n_components": 3, "bg_removal": "threshold",
            "bg_threshold": 0.5, "normalize": "auto"}[key]


# ------------------------------------------------------------------------------------------- running
@dataclass
class ImageResult:
    """What happened to one panorama: its files and mean metrics, or the error."""

    source: ImageSource
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    scalars: dict[str, float] | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # {"level/metric": reason}
    error: str | None = None


class Runner:
    """Analyse panoramas with one loaded encoder/resampler and write the files of each.

    Args:
        encoder: the vision encoder (on its device, eval mode).
        resampler: the resampler or None.
        plan: from :func:`plan_run`.
        name: the run's name (files are named after each image).
        output_dir: where the files go (a subfolder per image stem when there are several).
        checkpoint: the checkpoint path recorded in the JSON report.
        log: prints one line (default: to stderr).
        debug: print tracebacks of failing images.
        progress: show a progress bar (None: only on a terminal).
        warnings: caveats every report of this run repeats (e.g. weights missing from the checkpoint).
        step: the checkpoint's global step, recorded in the JSON report.
        epoch: the checkpoint's epoch, recorded in the JSON report.

    Example::

        >>> runner = Runner(model.encoder, model.resampler, plan, name="run1", output_dir="out")  # doctest: +SKIP
        >>> results = runner.run(resolve_images(["panos/"]))  # doctest: +SKIP
    """

    def __init__(self, encoder: Any, resampler: Any, plan: RunPlan, *, name: str, output_dir: str | os.PathLike,
                 checkpoint: str | os.PathLike | None = None, log: Log | None = None, debug: bool = False,
                 progress: bool | None = None, warnings: Sequence[str] = (), step: int | None = None,
                 epoch: int | None = None) -> None:
        from panoviz_callback.analysis import Analyzer

        self.encoder, self.resampler, self.plan = encoder, resampler, plan
        self.name, self.output_dir = name, Path(output_dir)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.log = log or _stderr
        self.debug, self.progress = debug, progress
        self.warnings = list(warnings)
        self.step, self.epoch = step, epoch
        self.analyzer = Analyzer(**plan.analysis, lpips_metric=_quiet_lpips(plan.analysis.get("metrics")))
        self.analyzer.load_state_dict({"pca_states": plan.pca_states})
        self._initial_states = dict(self.analyzer.pca_states)

    def run(self, sources: Sequence[ImageSource]) -> list[ImageResult]:
        """Analyse every source; failures are reported through ``log`` and skipped.

        Two-stage pipeline: the figures and reports of one panorama are written by a
        background thread while the next panorama is analysed (``render`` uses matplotlib's
        object-oriented API only, and only that thread draws).
        """
        from tqdm.auto import tqdm

        several = len(sources) > 1
        removed = clean_stale_staging(self.output_dir)
        if removed:
            self.log(f"note: removed {removed} staging folder(s) left by an interrupted run in '{self.output_dir}'")
        results: list[ImageResult] = []
        bar = tqdm(sources, desc="panoviz", unit="image", disable=None if self.progress is None else not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        pending: tuple[ImageResult, Future] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="panoviz-writer") as writer:
            try:
                for source in bar:
                    result = ImageResult(source=source, out_dir=self.output_dir / source.stem if several
                                         else self.output_dir)
                    results.append(result)
                    try:
                        analysis = self._analyse(source)
                    except Exception as err:  # noqa: BLE001 - one bad image must not stop the others
                        self._fail(bar, result, err)
                        analysis = None
                    if pending is not None:
                        self._finish(bar, *pending)
                        pending = None
                    if analysis is not None:
                        result.scalars, result.skipped = _summaries(analysis)
                        pending = result, writer.submit(self._write, analysis, result.out_dir, source)
                if pending is not None:
                    self._finish(bar, *pending)
            finally:
                bar.close()
        return results

    def _finish(self, bar: Any, result: ImageResult, future: Future) -> None:
        try:
            result.files = future.result()
        except Exception as err:  # noqa: BLE001 - a failed write fails this image only
            result.scalars, result.skipped = None, {}
            self._fail(bar, result, err)

    def _fail(self, bar: Any, result: ImageResult, err: Exception) -> None:
        result.error = _one_line(err)
        if self.debug:
            self._log(bar, "".join(traceback.format_exception(err)).rstrip())
        self._log(bar, f"error: {result.source.label}: {result.error} (skipped)")

    def _log(self, bar: Any, message: str) -> None:
        if getattr(bar, "disable", True):
            self.log(message)
        else:
            bar.write(f"panoviz: {message}", file=sys.stderr)

    def _analyse(self, source: ImageSource) -> Any:
        from panoviz_callback.views import make_views

        pano = self._load(source)
        views = make_views(pano, self.plan.crop_strategy, self.plan.image_size, **self.plan.crop_options)
        self.analyzer.pca_states = dict(self._initial_states)
        self.analyzer.freeze_pca = bool(self.plan.freeze_probe and source.spec is not None)
        with torch.no_grad():
            result = self.analyzer(views, self.encoder, self.resampler)
        for level, res in result.levels.items():
            if not torch.isfinite(res.features.tokens).all():
                raise FloatingPointError(f"the {level} features contain NaN or Inf values")
        return result

    def _load(self, source: ImageSource) -> Tensor:
        from panoviz_callback.panorama import load_panorama, synthetic_panorama

        spec = source.spec or {}
        if spec.get("kind") == "synthetic":
            return synthetic_panorama(**{k: v for k, v in spec.items() if k != "kind"})
        if spec.get("kind") == "tensor":
            pixels = spec["pixels"]
            return pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pano = load_panorama(source.path, max_width=spec.get("max_width", MAX_WIDTH))
        for w in caught:
            self.log(f"warning: {source.label}: {w.message}")
        height, width = pano.shape[-2:]
        if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
            raise ValueError(f"the image is too small ({width}x{height} px); a panorama must be at least "
                             f"{MIN_SIZE[0]}x{MIN_SIZE[1]} px")
        return pano

    def _write(self, result: Any, out: Path, source: ImageSource) -> dict[str, Path]:
        """All files into a temporary folder first, then moved in place: a failure leaves nothing."""
        from panoviz_callback.render import write_figures
        from panoviz_callback.report import write_reports

        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f"{_STAGE_PREFIX}{os.getpid()}-", dir=out))
        try:
            meta = {"settings": {"crop_strategy": self.plan.crop_strategy, "image_size": self.plan.image_size,
                                 "crop_options": dict(self.plan.crop_options), **self.analyzer.settings()},
                    "probe": source.recorded or _probe_label(source.spec), "step": self.step, "epoch": self.epoch}
            staged = {**write_figures(result, stage, source.stem),
                      **write_reports(result, stage, source.stem, image=source.recorded, checkpoint=self.checkpoint,
                                      warnings=self.warnings, meta=meta)}
            if result.inside is not None:
                from panoviz_callback.inside_render import write_inside_figures

                staged.update({f"inside/{k}": p for k, p in write_inside_figures(result, stage, source.stem).items()})
            files = {}
            for key, path in staged.items():
                files[key] = out / path.name
                os.replace(path, files[key])
            return files
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def clean_stale_staging(folder: Path) -> int:
    """Remove ``.panoviz-PID-*`` staging folders of processes that no longer run, in ``folder`` and its subfolders.

    Returns:
        How many were removed.
    """
    removed = 0
    if not folder.is_dir():
        return 0
    candidates = [folder, *(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))]
    for parent in candidates:
        for stage in parent.glob(f"{_STAGE_PREFIX}*"):
            m = re.match(re.escape(_STAGE_PREFIX) + r"(\d+)-", stage.name)
            if stage.is_dir() and not (m and _alive(int(m.group(1)))):
                shutil.rmtree(stage, ignore_errors=True)
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _summaries(result: Any) -> tuple[dict[str, float], dict[str, str]]:
    """The mean metrics and the skipped metrics (``{"level/metric": reason}``) of an analysis."""
    skipped = {f"{level}/{name}": m.skipped for level, res in result.levels.items() for name, m in res.metrics.items()
               if m.skipped is not None}
    return result.scalars(), skipped


def _quiet_lpips(metrics: Sequence[str] | None) -> Any:
    """An LPIPS metric built without its warning (the summary names the skip reason once), or None."""
    if metrics is not None and "lpips" not in metrics:
        return None
    from panoviz_callback.metrics import LPIPSMetric

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LPIPS is skipped")
        return LPIPSMetric()


def _probe_label(spec: Mapping[str, Any] | None) -> str | None:
    """How reports name an in-memory probe: ``synthetic(height=512, seed=0)`` or ``tensor``."""
    if not spec:
        return None
    if spec.get("kind") == "synthetic":
        return f"synthetic(height={spec.get('height')}, seed={spec.get('seed')})"
    return str(spec.get("kind"))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _stderr(message: str) -> None:
    print(f"panoviz: {message}", file=sys.stderr)
