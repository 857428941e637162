"""``PanoVizCallback``: watch a panoramic model's vision encoder and resampler learn, live.

The callback decides *when* to look; :class:`~panoviz_callback.analysis.Analyzer` does the
looking and :mod:`panoviz_callback.sinks` sends the result to the trainer's loggers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from panoviz_callback import sinks, timeline
from panoviz_callback._checks import _check_choice, _check_int, _check_shape
from panoviz_callback._state import preserved_modes, preserved_rng
from panoviz_callback.analysis import AnalysisResult, Analyzer
from panoviz_callback.lookup import ENCODER_SEARCH, RESAMPLER_SEARCH, find_module, find_part
from panoviz_callback.views import STRATEGIES

__all__ = ["PanoVizCallback", "ENCODER_SEARCH", "RESAMPLER_SEARCH", "find_module"]

_log = logging.getLogger(__name__)

_HOOKS = ("train_epoch_end", "validation_epoch_end")
_NO_RESAMPLER = ("none",)

#: The embedded probe when ``probe=None``: ``synthetic_panorama(**_SYNTHETIC_PROBE)``.
_SYNTHETIC_PROBE = {"height": 512, "seed": 0}
#: Probe files are downscaled on load to at most this width (views are far smaller).
_PROBE_MAX_WIDTH = 2048
_STATE_VERSION = 1
#: The first firing's tokens are kept (on the CPU) for the first-vs-latest image up to this many numbers per level.
_FIRST_TOKENS_MAX = 16 * 2**20


class PanoVizCallback(Callback):
    r"""Log PCA feature maps and cross-view metrics of a fixed probe panorama during training.

    At each firing the probe's views go through the LightningModule's vision encoder
    (and resampler) in ``eval`` mode under ``torch.no_grad()`` and the trainer's precision
    plugin; the token features are mapped to RGB by PCA and adjacent views are compared.
    Scalars ``panoviz/{level}/{metric}`` (with descriptions) and labelled images go to every
    logger of the trainer at the global step: ``panoviz/original_views``,
    ``panoviz/vision_encoder_pca``, ``panoviz/resampled_features_pca``, one PCA panorama per
    level (``panoviz/vision_encoder_pca_panorama``, ``panoviz/resampled_pca_panorama``), the
    metric timeline ``panoviz/timeline`` and, from the second firing of a fit,
    ``panoviz/{level}_pca_first_vs_latest`` (see :mod:`panoviz_callback.sinks`; TensorBoard
    shows 10 images per tag unless started with ``--samples_per_plugin images=100``).

    Training is left untouched: module modes (a frozen BatchNorm stays in ``eval``),
    ``requires_grad``, ``.grad`` and the global torch / NumPy / ``random`` states are
    restored, and no autograd graph is kept. Under DDP only global rank 0 runs the probe
    (no collective is entered); under sharded strategies (FSDP, ModelParallel, DeepSpeed
    stage 3) every rank runs the forward and rank 0 analyses and logs. An exception during
    a firing (a NaN feature, a missing attribute, out of memory, a logger error) is
    reported once per reason as a warning and the next firing tries again; ``strict=True``
    raises instead. A probe that cannot be read fails in ``setup``, before training.

    Args:
        probe: the probe panorama: a path to an equirectangular image (downscaled on load to
            at most 2048 px wide), a ``(3, H, W)`` tensor (float in ``[0, 1]`` or uint8), or
            None for the embedded ``synthetic_panorama(height=512, seed=0)``.
        crop_strategy: how the probe is cut into views, one of
            ``("e2p", "anyres_e2p", "cubemap", "sliding_window")``.
        image_size: view size ``S`` in pixels (the encoder's input size).
        fov_deg: tile field of view in degrees (None: the strategy's default).
        overlap: overlap of adjacent tiles in ``[0, 1)`` (None: the strategy's default).
        pitches: pitch rows of ``anyres_e2p`` tiles in degrees (None: the default ``(0,)``).
        crop_options: further keyword arguments of :func:`~panoviz_callback.make_views`.
        encoder: the vision encoder: a dotted attribute path into the LightningModule
            (``"model.vision_encoder"``), a callable, or ``"auto"`` (None means the same):
            the module's ``encoder_attr`` if it declares one, else the first of
            :data:`ENCODER_SEARCH` that exists: ``vision_encoder``, ``vision_tower``,
            ``vision_model``, ``vision_backbone.encoder``, ``visual``, ``image_encoder``,
            then the same under ``model.``, then ``encoder`` and ``model.encoder``.
        resampler: the resampler: a dotted path, a callable, ``"auto"`` (the module's
            ``resampler_attr``, else the first of :data:`RESAMPLER_SEARCH` that exists:
            ``resampler``, ``resampler_module.resampler``, ``mm_projector``,
            ``multi_modal_projector``, then the same under ``model.``; none found means no
            resampler level), or None / False / ``"none"`` for no resampler level.
        layer: encoder hidden-state index (``-1``: ``last_hidden_state``).
        keep_cls_token: keep prefix tokens (CLS, registers) in the encoder level.
        n_components: PCA components (1 gives a grey map).
        bg_removal: PCA background handling, one of
            ``("threshold", "remove_first_pc", "outlier_removal", "none")``.
        bg_threshold: first-PC threshold of ``bg_removal="threshold"``, in ``[0, 1]``.
        metrics: metric names to compute (None: all; LPIPS is skipped with a reason when its
            weights are not available offline).
        normalize: pixel normalisation for the encoder: ``"auto"`` (from the model type),
            a ``(mean, std)`` pair, or None (``[0, 1]`` pixels).
        every_n_epochs: fire every n-th epoch (None: no epoch schedule).
        every_n_train_steps: also fire after every n-th optimizer step (None: off).
        on: the epoch hook that fires: ``"train_epoch_end"`` (works without a validation
            loader) or ``"validation_epoch_end"`` (the sanity check never fires).
        log_images: log the images (scalars are always logged).
        save_dir: also write the runner's PNG figures and JSON/text reports here, named
            ``step{global_step:08d}`` (None: off).
        stable_colors: align each PCA fit with the previous one so colours do not jump.
        strict: raise errors of a firing instead of warning (for tests and debugging).
        inside: look inside the model (opt-in; off costs nothing): ``True`` for query and encoder
            attention maps, the ``layers="all"`` sweep and the agreement panoramas, or a dict of
            :class:`~panoviz_callback.inside.InsideOptions` fields (``{"attention": True}``,
            ``{"layers": [0, 6, 12]}``, ...). Adds the scalars and images of
            :mod:`panoviz_callback.inside` / :mod:`panoviz_callback.inside_render`.

    Raises:
        ValueError: an argument is out of range or not one of its choices.
        TypeError: an argument has the wrong type.

    Example::

        >>> from lightning.pytorch import Trainer  # doctest: +SKIP
        >>> cb = PanoVizCallback(crop_strategy="e2p", encoder="model.vision_encoder")  # doctest: +SKIP
        >>> Trainer(callbacks=[cb], max_epochs=10).fit(module)  # doctest: +SKIP
    """

    def __init__(
        self,
        probe: str | os.PathLike | Tensor | None = None,
        crop_strategy: Literal["e2p", "anyres_e2p", "cubemap", "sliding_window"] = "anyres_e2p",
        image_size: int = 224,
        fov_deg: float | None = None,
        overlap: float | None = None,
        pitches: Sequence[float] | None = None,
        crop_options: dict[str, Any] | None = None,
        encoder: str | Callable[..., Any] | None = "auto",
        resampler: str | Callable[..., Any] | bool | None = "auto",
        layer: int = -1,
        keep_cls_token: bool = False,
        n_components: int = 3,
        bg_removal: Literal["threshold", "remove_first_pc", "outlier_removal", "none"] = "threshold",
        bg_threshold: float = 0.5,
        metrics: Sequence[str] | None = None,
        normalize: str | Sequence[Sequence[float]] | None = "auto",
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        on: Literal["train_epoch_end", "validation_epoch_end"] = "train_epoch_end",
        log_images: bool = True,
        save_dir: str | os.PathLike | None = None,
        stable_colors: bool = True,
        strict: bool = False,
        inside: bool | dict[str, Any] | Any = None,
    ) -> None:
        _check_probe(probe)
        _check_choice(crop_strategy, STRATEGIES, "crop_strategy")
        _check_int(image_size, "image_size", 1)
        _check_int(every_n_epochs, "every_n_epochs", 1, allow_none=True)
        _check_int(every_n_train_steps, "every_n_train_steps", 1, allow_none=True)
        if every_n_epochs is None and every_n_train_steps is None:
            raise ValueError("Argument `every_n_epochs` must be set when `every_n_train_steps` is None "
                             "(otherwise the callback never fires).")
        _check_choice(on, _HOOKS, "on")
        for name, value in (("encoder", encoder), ("resampler", resampler)):
            if not (value is None or isinstance(value, str | bool) or callable(value)):
                raise TypeError(f"Expected `{name}` to be an attribute path, a callable or None, "
                                f"got {type(value).__name__}.")
        if encoder is False or encoder in _NO_RESAMPLER:
            raise ValueError(f"Argument `encoder` must be 'auto', an attribute path or a callable, got {encoder!r}.")
        self._analyzer = Analyzer(layer=layer, keep_cls_token=keep_cls_token, n_components=n_components,
                                  bg_removal=bg_removal, bg_threshold=bg_threshold, metrics=metrics,
                                  stable_colors=stable_colors, normalize=normalize, inside=inside)
        self.probe = probe
        self.crop_strategy = crop_strategy
        self.image_size = image_size
        given = {"fov_deg": fov_deg, "overlap": overlap, "pitches": None if pitches is None else list(pitches)}
        self.crop_options = {**(crop_options or {}), **{k: v for k, v in given.items() if v is not None}}
        self.encoder = "auto" if encoder is None else encoder
        self.resampler = None if resampler is False or resampler in _NO_RESAMPLER else resampler
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.on = on
        self.log_images = bool(log_images)
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.strict = bool(strict)

        self.history: list[dict[str, Any]] = []  # one {"step", "epoch", "scalars"} per successful firing
        self.last_result: AnalysisResult | None = None
        self._probe_spec: dict[str, Any] | None = None
        self._views: Any = None  # the probe's ViewSet on the CPU, cut in setup
        self._device_views: Any = None  # the views on the module's device, made at the first firing of a fit
        self._module_class: str | None = None
        self._precision: str | None = None
        self._paths: dict[str, str | None] = {"encoder": None, "resampler": None}
        self._vision_stage: dict[str, Any] | None = None  # how to rebuild the parts without the user's code
        self._last_step: int | None = None
        self._views_logged = False
        self._warned: set[str] = set()
        self._first: dict[str, tuple[Tensor, tuple[int, int]]] = {}  # level -> first firing's tokens, (step, epoch)

    @property
    @override
    def state_key(self) -> str:
        probe = self.probe if self.probe is None or isinstance(self.probe, str | os.PathLike) else "tensor"
        return self._generate_state_key(probe=str(probe), crop_strategy=self.crop_strategy, on=self.on)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        cls = type(pl_module)
        self._module_class = f"{cls.__module__}:{cls.__qualname__}"
        self._precision = str(trainer.precision)
        if self._views is None:
            self._views = self._cut_probe()
        if not trainer.loggers and self.save_dir is None:
            rank_zero_warn("`PanoVizCallback` has no logger and no `save_dir`: its results are kept only in "
                           "`callback.history` and the checkpoint.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._views_logged = False
        self._first = {}
        self._last_step = None
        self._vision_stage = None
        self._guarded(lambda: self._resolve_modules(pl_module))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = self.every_n_train_steps
        if n is not None and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._fire(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "train_epoch_end" and self._epoch_due(trainer):
            self._fire(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "validation_epoch_end" and not trainer.sanity_checking and self._epoch_due(trainer):
            self._fire(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._device_views = None

    @override
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a resume and to reproduce the analysis offline.

        Only tensors and plain Python types (``torch.load(weights_only=True)`` reads it); in a
        checkpoint it sits under ``checkpoint["callbacks"][callback.state_key]`` (a key that starts
        with ``"PanoVizCallback"``). Keys:

        - ``version``: 1.
        - ``module_class``: ``"package.module:ClassName"`` of the LightningModule (``__main__:...``
          when it was defined in the training script).
        - ``encoder_path`` / ``resampler_path``: the resolved attribute paths (None for callables,
          or no resampler).
        - ``vision_stage``: plain data to rebuild the parts without the module's code (the encoder's
          transformers config, the resampler's type and sizes; see
          :func:`~panoviz_callback.vision_stage.describe_parts`).
        - ``precision``: the trainer's precision the live forward ran under (e.g. ``"bf16-mixed"``).
        - ``probe``: ``{"kind": "synthetic", "height", "seed"}``, ``{"kind": "path", "path",
          "max_width"}`` or ``{"kind": "tensor", "pixels": (3, H, W) uint8}``.
        - ``settings``: crop (``crop_strategy``, ``image_size``, resolved ``crop_options``), the
          analysis settings of :meth:`Analyzer.settings` and the schedule.
        - ``pca_states``: ``{level: PCAState.state_dict()}`` after the last firing.
        - ``history``: ``[{"step", "epoch", "scalars": {"level/metric": value}}]``, one per firing.
        """
        return {
            "version": _STATE_VERSION,
            "module_class": self._module_class,
            "encoder_path": self._paths["encoder"],
            "resampler_path": self._paths["resampler"],
            "vision_stage": self._vision_stage,
            "precision": self._precision,
            "probe": None if self._probe_spec is None else dict(self._probe_spec),
            "settings": self._settings(),
            "pca_states": self._analyzer.state_dict()["pca_states"],
            "history": [{**h, "scalars": dict(h["scalars"])} for h in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [{**h, "scalars": dict(h["scalars"])} for h in state_dict.get("history", [])]
        saved = state_dict.get("settings", {})
        if self._views is not None and any(saved.get(k) != v for k, v in self._analysis_settings().items()):
            rank_zero_warn("`PanoVizCallback` settings differ from the checkpoint's; colours and history may not "
                           "continue seamlessly.")
        try:
            self._analyzer.load_state_dict({"pca_states": state_dict.get("pca_states", {})})
        except Exception as err:  # noqa: BLE001 - a stale PCA state must not stop a resume
            rank_zero_warn(f"`PanoVizCallback` could not restore its PCA state ({err}); colours start fresh.")

    # ------------------------------------------------------------- scheduling
    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        return self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _fire(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self._views is None or step == self._last_step:  # not set up for fit; or both schedules met
            return
        self._last_step = step
        if trainer.is_global_zero or _is_sharded(trainer.strategy):
            self._guarded(lambda: self._run(trainer, pl_module), step)

    def _guarded(self, fn: Callable[[], None], step: int | None = None) -> None:
        """Run ``fn``; report an exception once per reason (or re-raise it with ``strict``)."""
        try:
            fn()
        except Exception as err:
            if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            if self.strict:
                raise
            _log.debug("PanoVizCallback failure", exc_info=True)
            reason = f"{type(err).__name__}: {err}"
            if reason not in self._warned:
                self._warned.add(reason)
                where = "" if step is None else f" at global step {step}"
                rank_zero_warn(f"`PanoVizCallback` skipped the probe analysis{where}: {reason}. Training continues "
                               "and the callback tries again at the next firing (strict=True raises instead).")

    # ----------------------------------------------------------------- firing
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        encoder, resampler = self._resolve_modules(pl_module)
        views = self._views_for(pl_module, trainer.precision_plugin)
        with preserved_rng():
            with (preserved_modes(pl_module, encoder, resampler), torch.no_grad(),
                  trainer.precision_plugin.forward_context()):
                for module in (pl_module, encoder, resampler):
                    if isinstance(module, nn.Module):
                        module.eval()
                if not trainer.is_global_zero:  # sharded: the other ranks only take part in the forward
                    Analyzer(**{**self._analyzer.settings(), "metrics": (), "stable_colors": False})(
                        views, encoder, resampler)
                    return
                result = self._analyse(views, encoder, resampler)
            self._publish(trainer, result)

    def _analyse(self, views: Any, encoder: Any, resampler: Any) -> AnalysisResult:
        """Run the analyzer; on any failure its PCA states are put back, so colours survive a bad firing."""
        saved = dict(self._analyzer.pca_states)
        try:
            with _finite_outputs(encoder=encoder, resampler=resampler):
                result = self._analyzer(views, encoder, resampler)
            for name, level in result.levels.items():  # callables that are no modules have no hook
                if not torch.isfinite(level.features.tokens).all():
                    raise FloatingPointError(f"the {name} features contain NaN or Inf values")
        except BaseException:
            self._analyzer.pca_states = saved
            raise
        return result

    def _publish(self, trainer: pl.Trainer, result: AnalysisResult) -> None:
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        scalars = result.scalars()
        self.last_result = result
        self.history.append({"step": step, "epoch": epoch, "scalars": scalars})
        if not self._first:
            self._first = {level: (timeline.grid_tokens(res.features).detach().float().cpu(), (step, epoch))
                           for level, res in result.levels.items()
                           if res.features.tokens.numel() <= _FIRST_TOKENS_MAX}
        images = self._images(result, step, epoch) if self.log_images else {}
        if self.log_images and result.inside is not None:
            from panoviz_callback.inside_render import inside_images

            images.update(inside_images(result))
        sinks.log_firing(trainer.loggers, scalars, images, step, epoch)
        self._views_logged = self._views_logged or bool(images)
        if self.save_dir is not None:
            self._save_files(result, f"step{step:08d}", step, epoch)

    def _images(self, result: AnalysisResult, step: int, epoch: int) -> dict[str, Tensor]:
        """The labelled images of a firing, the metric timeline and the first-vs-latest PCA per level."""
        images = sinks.render_images(result, with_views=not self._views_logged, step=step, epoch=epoch)
        images[sinks.IMAGE_TAGS["timeline"]] = timeline.timeline_image(self.history)
        for level, (tokens, first) in self._first.items():
            if first[0] == step or level not in result.levels:
                continue
            image = timeline.first_vs_latest_image(tokens, result, level, self._analyzer.settings(), first=first,
                                                   latest=(step, epoch))
            if image is not None:
                images[sinks.IMAGE_TAGS[f"{level}_evolution"]] = image
        return images

    def _save_files(self, result: AnalysisResult, name: str, step: int, epoch: int) -> None:
        from panoviz_callback import __version__
        from panoviz_callback.render import write_figures
        from panoviz_callback.report import write_reports

        write_figures(result, self.save_dir, name)
        if result.inside is not None:
            from panoviz_callback.inside_render import write_inside_figures

            write_inside_figures(result, self.save_dir, name)
        probe_path = self._probe_spec.get("path") if self._probe_spec else None
        meta = {"settings": self._analysis_settings(), "probe": _probe_label(self._probe_spec), "step": step,
                "epoch": epoch, "version": __version__}
        write_reports(result, self.save_dir, name, image=probe_path, meta=meta)
        timeline.write_timeline(self.history, Path(self.save_dir) / "timeline.png")

    # ------------------------------------------------------------ probe/views
    def _cut_probe(self) -> Any:
        """Load the probe and cut it into views (runs on every rank, so a bad probe fails everywhere)."""
        from panoviz_callback.views import make_views

        pano, self._probe_spec = _load_probe(self.probe)
        return make_views(pano, self.crop_strategy, image_size=self.image_size, **self.crop_options)

    def _views_for(self, pl_module: pl.LightningModule, precision: Any) -> Any:
        """The views on the module's device, converted by the precision plugin (kept until teardown)."""
        if self._device_views is None:
            views = self._views.to(pl_module.device)
            self._device_views = dataclasses.replace(views, pixels=precision.convert_input(views.pixels))
        return self._device_views

    def _analysis_settings(self) -> dict[str, Any]:
        """The settings that decide the numbers and colours (the runner reproduces the analysis from these)."""
        options = getattr(self._views, "options", None) or self.crop_options
        return {"crop_strategy": self.crop_strategy, "image_size": self.image_size, "crop_options": _plain(options),
                **self._analyzer.settings()}

    def _settings(self) -> dict[str, Any]:
        return {
            **self._analysis_settings(),
            "every_n_epochs": self.every_n_epochs, "every_n_train_steps": self.every_n_train_steps, "on": self.on,
            "log_images": self.log_images, "save_dir": None if self.save_dir is None else str(self.save_dir),
        }

    # ---------------------------------------------------------------- modules
    def _resolve_modules(self, pl_module: pl.LightningModule) -> tuple[Any, Any]:
        """The encoder and resampler of ``pl_module``; records their attribute paths."""
        if self.encoder == "auto" and self.resampler == "auto":
            from panoviz_callback.panollava.live import find_live_stage

            stage = find_live_stage(pl_module)  # PanoLLaVA: the HF model, and norm + resampler as it computes them
            if stage is not None:
                self._paths = dict(stage.paths)
                if self._vision_stage is None:
                    self._vision_stage = {"family": "panollava", "revision": stage.revision}
                return stage.encoder, stage.resampler
        encoder, self._paths["encoder"] = find_part(pl_module, self.encoder, ENCODER_SEARCH, "encoder", required=True)
        resampler, self._paths["resampler"] = find_part(pl_module, self.resampler, RESAMPLER_SEARCH, "resampler",
                                                    required=False, exclude=encoder)
        if self._vision_stage is None:
            from panoviz_callback.described import describe_parts

            self._vision_stage = describe_parts(encoder, resampler)
        return encoder, resampler


# ---------------------------------------------------------------------- helpers
def _check_probe(probe: Any) -> None:
    if probe is None or isinstance(probe, str | os.PathLike):
        return
    if not isinstance(probe, Tensor):
        raise TypeError(f"Expected `probe` to be a path, a (3, H, W) tensor or None, got {type(probe).__name__}.")
    _check_shape(probe, "3 H W", "probe")
    if probe.dtype != torch.uint8 and not (probe.is_floating_point() and 0 <= probe.min() and probe.max() <= 1):
        raise ValueError("Argument `probe` must be a uint8 tensor or a float tensor with values in [0, 1].")


def _load_probe(probe: Any) -> tuple[Tensor, dict[str, Any]]:
    """The probe panorama ``(3, H, W)`` float32 on the CPU and its spec for the checkpoint."""
    from panoviz_callback.panorama import PanoramaError, load_panorama, synthetic_panorama

    if probe is None:
        return synthetic_panorama(**_SYNTHETIC_PROBE), {"kind": "synthetic", **_SYNTHETIC_PROBE}
    if isinstance(probe, Tensor):  # stored as uint8, so the live and offline pixels are the same
        pixels = probe.detach().cpu()
        if pixels.dtype != torch.uint8:
            pixels = (pixels.float() * 255).round().to(torch.uint8)
        return pixels.float() / 255, {"kind": "tensor", "pixels": pixels}
    path = Path(probe).expanduser().resolve()
    try:
        pano = load_panorama(path, max_width=_PROBE_MAX_WIDTH)
    except PanoramaError as err:
        raise PanoramaError(f"`PanoVizCallback` could not read its probe: {err}") from err
    return pano, {"kind": "path", "path": str(path), "max_width": _PROBE_MAX_WIDTH}


def _probe_label(spec: dict[str, Any] | None) -> str | None:
    """How reports name the probe: its path, ``synthetic(height=512, seed=0)`` or ``tensor``."""
    if spec is None:
        return None
    if spec.get("kind") == "path":
        return str(spec.get("path"))
    if spec.get("kind") == "synthetic":
        return f"synthetic(height={spec.get('height')}, seed={spec.get('seed')})"
    return str(spec.get("kind"))


@contextlib.contextmanager
def _finite_outputs(**modules: Any) -> Iterator[None]:
    """Raise ``FloatingPointError`` as soon as a module's output holds NaN or Inf (before the analysis uses it)."""

    def check(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if any(not torch.isfinite(t).all() for t in _float_tensors(output)):
                raise FloatingPointError(f"the {name} output contains NaN or Inf values")
        return hook

    handles = [m.register_forward_hook(check(name)) for name, m in modules.items() if isinstance(m, nn.Module)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _float_tensors(output: Any) -> Iterator[Tensor]:
    """The floating-point tensors in a module output (a tensor, a tuple, a dict or a transformers output)."""
    if isinstance(output, Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _float_tensors(value)
    elif isinstance(output, list | tuple):
        for value in output:
            yield from _float_tensors(value)


def _is_sharded(strategy: Any) -> bool:
    """True for strategies whose parameters are sharded across ranks (every rank must run the forward)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy | ModelParallelStrategy):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and bool(getattr(strategy, "zero_stage_3", False))


def _plain(value: Any) -> Any:
    """``value`` with tuples turned into lists and numbers into Python scalars (checkpoint-safe)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    return value
