"""Rebuild PanoLLaVA's vision stage from a checkpoint: the HF encoder, the VICReg LayerNorm, the resampler.

:class:`PanoLLaVAResampler` is what the analysis calls the resampler: it takes *all* the
encoder's ``last_hidden_state`` tokens (CLS and registers included, ``input_tokens = "all"``),
applies the LayerNorm the model had (an identity when it had none) and the resampler, exactly
as PanoLLaVA's forward does; for token-wise resamplers the outputs of the prefix tokens are
dropped afterwards so the rest lies on the patch grid. The encoder level of the analysis shows
the encoder's ``last_hidden_state`` *before* the LayerNorm (the features the encoder itself
computes); the resampled level is PanoLLaVA's resampler output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from panoviz_callback.checkpoint import Log, ModelSpecError, _first_line, check_limit
from panoviz_callback.panollava.layouts import LAYOUTS, Layout, read_settings

__all__ = ["PanoLLaVAResampler", "describe", "build"]


class PanoLLaVAResampler(nn.Module):
    """``resampler(norm(tokens))`` on all encoder tokens, as PanoLLaVA computes it.

    Args:
        resampler: the rebuilt PanoLLaVA resampler.
        norm: the VICReg LayerNorm (``nn.Identity()`` when the model had none).
        num_prefix_tokens: CLS + register tokens at the front of the encoder's output.

    Shape:
        ``(V, P + N, D) -> (V, N, D')`` for token-wise resamplers (prefix outputs dropped),
        ``(V, M, D')`` otherwise.
    """

    input_tokens = "all"

    def __init__(self, resampler: nn.Module, norm: nn.Module, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.norm, self.resampler = norm, resampler
        self.num_prefix_tokens = num_prefix_tokens
        self.output_layout = getattr(resampler, "layout", getattr(resampler, "output_layout", None))

    def forward(self, tokens: Tensor) -> Tensor:
        out = self.resampler(self.norm(tokens))
        out = out[0] if isinstance(out, tuple | list) else out
        p = self.num_prefix_tokens
        n = tokens.shape[1] - p
        side = math.isqrt(max(n, 0))
        if hasattr(self.resampler, "output_prefix_tokens"):
            strip = int(self.resampler.output_prefix_tokens(p))
        else:  # a token-wise module keeps one output per input token
            strip = p if self.output_layout != "queries" and out.shape[1] == tokens.shape[1] else 0
        out = out[:, strip:]
        if hasattr(self.resampler, "output_grid") and side * side == n:
            # PanoLLaVA lays some sequences (CLS included) on grids that are not the patch grid: drawn as strips
            grid = self.resampler.output_grid((side, side), p)
            self.output_layout = "queries" if grid is None else "grid"
        return out


def describe(ckpt: Mapping[str, Any], layout: Layout, *, config: Mapping[str, Any], config_name: str,
             common: Mapping[str, Any]) -> Any:
    """The :class:`~panoviz_callback.vision_stage.ModelSpec` of a PanoLLaVA checkpoint.

    Raises:
        ModelSpecError: no ``vision_name`` anywhere, or a setting out of range.
    """
    from panoviz_callback.vision_stage import ModelSpec, _require

    settings = read_settings(ckpt, layout, config)
    _require(settings, ("vision_name",), bool(config), config_name, "a PanoLLaVA checkpoint")
    keys = [str(k) for k in ckpt["state_dict"].keys()]
    resampler = next((p for p in layout.resampler if any(k.startswith(p) for k in keys)), None)
    geometry = dict(common.get("geometry") or {})
    settings["py360_geometry"] = dict(geometry)  # the generic (py360convert) views, for --view_convention py360
    view = _view_settings(settings)
    if view is not None:
        geometry = {"crop_strategy": view["strategy"], "image_size": view["image_size"],
                    "crop_options": view["options"], "convention": view.get("convention")}
    rtype = str(settings.get("resampler_type") or "mlp").lower()
    norm = "with the VICReg LayerNorm" if settings["use_vicreg_norm"] else "no VICReg LayerNorm"
    source = f"PanoLLaVA {layout.revision} layout ({layout.encoder}*), {rtype} resampler, {norm}"
    return ModelSpec("panollava", source, settings, None,
                     {"encoder": layout.encoder, "norm": layout.norm, "resampler": resampler},
                     **{**common, "geometry": geometry})


def _view_settings(settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """PanoLLaVA's own view convention when the views module knows it (None: the generic geometry)."""
    try:
        from panoviz_callback.panollava.views import panollava_view_settings
    except ImportError:
        return None
    if not settings.get("crop_strategy") and not settings.get("vision_name"):
        return None
    try:
        return panollava_view_settings(settings, settings["revision"])
    except (ValueError, KeyError, TypeError) as err:
        raise ModelSpecError(f"the PanoLLaVA view settings cannot be used: {_first_line(err)}") from None


def build(spec: Any, state_dict: Mapping[str, Any], *, strict: bool, device: Any, log: Log,
          allow_missing: bool = False) -> Any:
    """Build and load the encoder, the LayerNorm and the resampler of a PanoLLaVA ``spec``.

    Missing weights in the encoder, the norm or the resampler are an error unless
    ``allow_missing`` (a randomly initialised part is never analysed silently); with ``strict``
    unexpected keys are too.

    Raises:
        ModelSpecError: the parts cannot be built (unknown resampler type, uncached ``vision_name``).
        WeightsError: a weight is missing or has the wrong shape.
    """
    from panoviz_callback.vision_stage import CheckpointModel
    from panoviz_callback.weights import LoadReport, finish_load
    from panoviz_callback.weights import load_part as _load_part

    h, prefixes = spec.hparams, dict(spec.prefixes)
    has_encoder = any(str(k).startswith(prefixes["encoder"]) for k in state_dict)
    encoder = _encoder(h["vision_name"], pretrained=not has_encoder)
    vision_dim = _hidden_size(encoder)
    report = LoadReport(prefixes={"encoder": prefixes["encoder"]})
    _load_part("encoder", encoder, _without(state_dict, prefixes), prefixes["encoder"], report, align=True)
    if not has_encoder:
        report.missing["encoder"] = []
        log(f"note: the checkpoint holds no encoder weights under '{prefixes['encoder']}'; the encoder keeps the "
            f"pretrained weights of {h['vision_name']}")
    resampler = None
    if prefixes.get("resampler") is None:
        log(f"note: the checkpoint holds no resampler weights (under {' or '.join(LAYOUTS[h['revision']].resampler)}); "
            "only the encoder level is analysed")
    else:
        norm: nn.Module = nn.LayerNorm(vision_dim) if h.get("use_vicreg_norm") else nn.Identity()
        sliced = {k[len(prefixes["resampler"]):]: v for k, v in state_dict.items()
                  if str(k).startswith(prefixes["resampler"])}
        inner = _resampler(h, vision_dim, sliced, log)
        resampler = PanoLLaVAResampler(inner, norm, _num_prefix_tokens(encoder))
        report.prefixes["norm"] = prefixes["norm"] if h.get("use_vicreg_norm") else None
        if h.get("use_vicreg_norm"):
            _load_part("norm", norm, state_dict, prefixes["norm"], report, align=False)
        report.prefixes["resampler"] = prefixes["resampler"]
        _load_part("resampler", inner, state_dict, prefixes["resampler"], report, align=False)
    finish_load(report, strict, log, allow_missing)
    for part in (encoder, resampler):
        if isinstance(part, nn.Module):
            part.requires_grad_(False).eval().to(device)
    return CheckpointModel(encoder=encoder, resampler=resampler, spec=spec, report=report)


def _without(state_dict: Mapping[str, Any], prefixes: Mapping[str, str | None]) -> dict[str, Any]:
    """The state dict without the norm's and the resampler's keys (7227614 nests nothing, head nests the norm)."""
    others = tuple(p for key, p in prefixes.items() if key != "encoder" and p)
    return {k: v for k, v in state_dict.items() if not str(k).startswith(others)}


def _encoder(vision_name: Any, *, pretrained: bool) -> nn.Module:
    from panoviz_callback.features import load_vision_encoder

    try:
        return load_vision_encoder(vision_name, pretrained=pretrained)
    except (ValueError, TypeError, OSError) as err:
        raise ModelSpecError(f"cannot build the PanoLLaVA vision encoder `{vision_name}`: {_first_line(err)}") from None


def _resampler(h: Mapping[str, Any], vision_dim: int, weights: Mapping[str, Tensor], log: Log) -> nn.Module:
    from panoviz_callback.panollava.resamplers import build_panollava_resampler

    rtype = str(h.get("resampler_type") or "mlp").lower()
    latent = h.get("latent_dimension")
    if latent is not None:
        check_limit(latent, "hidden size", "the checkpoint's latent_dimension")
    config = {k: v for k, v in h.items() if str(k).startswith("resampler_") and k != "resampler_type"}
    config["resampler_config"] = dict(h.get("resampler_config") or {})
    try:
        return build_panollava_resampler(rtype, vision_dim=vision_dim, latent_dim=None if latent is None else int(latent),
                                         config=config, revision=h["revision"], state_dict=weights)
    except (ValueError, TypeError, KeyError) as err:
        raise ModelSpecError(f"cannot rebuild the PanoLLaVA {rtype!r} resampler ({h['revision']} layout): "
                             f"{_first_line(err)}") from None


def _hidden_size(encoder: nn.Module) -> int:
    from panoviz_callback.models.stage import encoder_hidden_size

    try:
        return encoder_hidden_size(encoder)
    except ValueError as err:
        raise ModelSpecError(_first_line(err)) from None


def _num_prefix_tokens(encoder: nn.Module) -> int:
    from panoviz_callback.features import _num_prefix, _resolve

    try:
        return _num_prefix(_resolve(encoder))
    except (ValueError, AttributeError):
        return 0
