"""Recognise a PanoLLaVA checkpoint from its keys, read its settings, rebuild its vision stage."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from panoviz_callback.checkpoint import Log, ModelSpecError, _first_line

__all__ = ["ENCODER_PREFIXES", "RESAMPLER_PREFIXES", "detect_layout", "describe", "build"]

ENCODER_PREFIXES = ("model.vision_encoder.", "model.vision_backbone.encoder.")
RESAMPLER_PREFIXES = ("model.resampler_module.resampler.", "model.resampler.")


def _find_prefix(keys: list[str], prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if any(k.startswith(p) for k in keys)), None)


def detect_layout(ckpt: Mapping[str, Any]) -> str | None:
    """The PanoLLaVA layout of ``ckpt`` (``"panollava"``), or None when its keys are not PanoLLaVA's."""
    keys = list(ckpt["state_dict"].keys())
    if _find_prefix(keys, ENCODER_PREFIXES) or _find_prefix(keys, RESAMPLER_PREFIXES):
        return "panollava"
    return None


def describe(ckpt: Mapping[str, Any], layout: str, *, config: Mapping[str, Any], config_name: str,
             common: Mapping[str, Any]) -> Any:
    """The :class:`~panoviz_callback.vision_stage.ModelSpec` of a PanoLLaVA checkpoint."""
    from panoviz_callback.vision_stage import ModelSpec, _config_hparams, _merge, _plain_dict, _require

    keys = list(ckpt["state_dict"].keys())
    hparams = _merge(_plain_dict(ckpt.get("hyper_parameters")), _config_hparams(config))
    enc_prefix = _find_prefix(keys, ENCODER_PREFIXES) or ENCODER_PREFIXES[0]
    res_prefix = _find_prefix(keys, RESAMPLER_PREFIXES)
    _require(hparams, ("vision_name",), bool(config), config_name, "a PanoLLaVA checkpoint")
    return ModelSpec("panollava", f"PanoLLaVA layout ({enc_prefix}*)", hparams, None,
                     {"encoder": enc_prefix, "resampler": res_prefix}, **common)


def build(spec: Any, state_dict: Mapping[str, Any], *, strict: bool, device: Any, log: Log) -> Any:
    """Build and load the encoder and resampler of a PanoLLaVA ``spec``."""
    from panoviz_callback.vision_stage import CheckpointModel, LoadReport, _load_part, finish_load

    prefixes = dict(spec.prefixes)
    try:
        encoder, resampler = _build_parts(spec, state_dict, log)
    except ModelSpecError:
        raise
    except (ValueError, TypeError, OSError) as err:
        raise ModelSpecError(f"cannot build the vision encoder/resampler of {spec.source}: "
                             f"{_first_line(err)}") from None
    report = LoadReport(prefixes={"encoder": prefixes["encoder"]})
    _load_part("encoder", encoder, state_dict, prefixes["encoder"], report, align=True)
    if report.loaded["encoder"] == 0 and not report.unexpected["encoder"]:
        report.missing["encoder"] = []  # built with the pretrained weights of vision_name
        log(f"note: the checkpoint holds no encoder weights under '{prefixes['encoder']}'; the encoder keeps the "
            f"pretrained weights of {spec.hparams['vision_name']}")
    if prefixes.get("resampler") is None:
        resampler = None
        log(f"note: the checkpoint holds no resampler weights (under {' or '.join(RESAMPLER_PREFIXES)}); "
            "only the encoder level is analysed")
    if resampler is not None:
        report.prefixes["resampler"] = prefixes["resampler"]
        _load_part("resampler", resampler, state_dict, prefixes["resampler"], report, align=False)
    finish_load(report, strict, log)
    for part in (encoder, resampler):
        if isinstance(part, nn.Module):
            part.requires_grad_(False).eval().to(device)
    return CheckpointModel(encoder=encoder, resampler=resampler, spec=spec, report=report)


def _build_parts(spec: Any, state_dict: Mapping[str, Any], log: Log) -> tuple[nn.Module, nn.Module]:
    from panoviz_callback.features import load_vision_encoder
    from panoviz_callback.models.resamplers import MLPResampler, build_resampler

    h = spec.hparams
    has_encoder = any(k.startswith(spec.prefixes["encoder"]) for k in state_dict)
    encoder = load_vision_encoder(h["vision_name"], pretrained=not has_encoder)
    in_dim = _hidden_size(encoder)
    kind = str(h.get("resampler_type") or "mlp").lower()
    prefix = spec.prefixes.get("resampler")
    if kind == "identity" or prefix is None:
        return encoder, build_resampler("identity", in_dim)
    if kind != "mlp":
        raise ModelSpecError(f"resampler_type {kind!r} of a PanoLLaVA checkpoint is not supported (supported: 'mlp', "
                             "'identity')")
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    linears = sorted((int(m.group(1)), weights[k].shape) for k in weights
                     if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)) and weights[k].dim() == 2)
    out_dim = h.get("latent_dimension")
    if linears:  # depth and width as trained (PanoLLaVA versions differ), output size as configured
        if out_dim is None:
            out_dim = int(linears[-1][1][0])
            log(f"note: `latent_dimension` not given; using {out_dim} from the resampler's weights")
        hidden = int(linears[0][1][0]) if len(linears) > 1 else None
        return encoder, MLPResampler(in_dim, int(out_dim), hidden_dim=hidden, depth=len(linears))
    if out_dim is None:
        raise ModelSpecError("the model cannot be rebuilt: `latent_dimension` is missing and the checkpoint holds no "
                             "resampler weights to read it from; add `latent_dimension: N` to --config")
    return encoder, build_resampler("mlp", in_dim, int(out_dim), depth=int(h.get("resampler_depth") or 3))


def _hidden_size(encoder: nn.Module) -> int:
    cfg = getattr(encoder, "config", None)
    cfg = getattr(cfg, "vision_config", None) or cfg
    size = getattr(cfg, "hidden_size", None)
    if size is None:
        raise ModelSpecError("cannot read the encoder's hidden size from its config (`config.hidden_size`)")
    return int(size)



