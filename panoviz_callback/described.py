"""Rebuild a user's vision stage without the user's code, from what the callback recorded.

:func:`describe_parts` (run by :class:`~panoviz_callback.PanoVizCallback`) records the encoder's
transformers config and this package's resampler type and sizes as plain data; the runner
rebuilds both from that record with transformers and :mod:`panoviz_callback.models.resamplers`,
after checking every size against :data:`~panoviz_callback.checkpoint.LIMITS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from panoviz_callback.checkpoint import ModelSpecError, check_limit

__all__ = ["describe_parts", "build_described", "check_model_config"]


def build_described(spec: Any, state_dict: Mapping[str, Any]) -> tuple[nn.Module, nn.Module | None]:
    """Encoder from the recorded transformers config, resampler from the recorded type and sizes."""
    from panoviz_callback.features import load_vision_encoder
    from panoviz_callback.models.resamplers import RESAMPLER_KINDS, MLPResampler, build_resampler

    enc = spec.hparams.get("encoder") or {}
    config = enc.get("config") if isinstance(enc, Mapping) else None
    if enc.get("kind") != "transformers" or not isinstance(config, Mapping) or "model_type" not in config:
        raise ModelSpecError("the checkpoint's description of the encoder is not a transformers config")
    check_model_config(config, "the checkpoint's encoder config")
    encoder = load_vision_encoder(dict(config), pretrained=False)
    res = spec.hparams.get("resampler")
    if spec.prefixes.get("resampler") is None or not res:
        return encoder, None
    if res.get("kind") != "panoviz" or res.get("type") not in RESAMPLER_KINDS:
        raise ModelSpecError(f"the checkpoint describes a resampler this package cannot build ({res.get('type')!r})")
    sizes = {k: res[k] for k in ("in_dim", "out_dim", "hidden_dim", "num_queries", "depth", "heads")
             if res.get(k) is not None}
    for key in ("in_dim", "out_dim", "hidden_dim"):
        check_limit(sizes.get(key, 1), "hidden size", f"the checkpoint's resampler {key}")
    check_limit(sizes.get("num_queries", 1), "num_queries", "the checkpoint's resampler")
    check_limit(sizes.get("depth", 1), "number of layers", "the checkpoint's resampler depth")
    check_limit(sizes.get("heads", 1), "attention heads", "the checkpoint's resampler")
    in_dim, out_dim = sizes.pop("in_dim"), sizes.pop("out_dim", None)
    if res["type"] == "mlp":
        return encoder, MLPResampler(in_dim, out_dim or in_dim, hidden_dim=sizes.get("hidden_dim"),
                                     depth=sizes.get("depth", 3))
    sizes.pop("hidden_dim", None)
    return encoder, build_resampler(res["type"], in_dim, out_dim, **sizes)


_CONFIG_LIMITS = (("hidden_size", "hidden size"), ("intermediate_size", "intermediate size"),
                  ("num_hidden_layers", "number of layers"), ("num_attention_heads", "attention heads"),
                  ("image_size", "image_size"), ("patch_size", "patch size"))


def check_model_config(config: Mapping[str, Any], source: str) -> None:
    """Check the sizes of a transformers config read from a file (also its ``vision_config``) against the caps."""
    for cfg in (config, config.get("vision_config")):
        if not isinstance(cfg, Mapping):
            continue
        for key, limit in _CONFIG_LIMITS:
            if cfg.get(key) is not None:
                value = cfg[key]
                value = value[0] if isinstance(value, list | tuple) and value else value
                check_limit(value, limit, f"{source} ({key})")


def describe_parts(encoder: Any, resampler: Any) -> dict[str, Any]:
    """What the runner needs to rebuild ``encoder`` and ``resampler`` without the user's code (plain data).

    ``{"encoder": {"kind": "transformers", "config": {...}} | None, "resampler": {"kind": "panoviz",
    "type", "in_dim", "out_dim", ...} | None}``; None where a part is neither a transformers model nor
    one of this package's resamplers.
    """
    import json

    from panoviz_callback.models import resamplers as rs

    out: dict[str, Any] = {"encoder": None, "resampler": None}
    cfg = getattr(encoder, "config", None)
    to_json = getattr(cfg, "to_json_string", None)
    if callable(to_json) and getattr(cfg, "model_type", None):
        try:
            out["encoder"] = {"kind": "transformers", "config": json.loads(to_json(use_diff=False))}
        except (TypeError, ValueError):
            pass
    kinds = {rs.IdentityResampler: "identity", rs.MLPResampler: "mlp", rs.QFormerResampler: "qformer",
             rs.PerceiverResampler: "perceiver"}
    kind = kinds.get(type(resampler))
    if kind is not None:
        desc = {"kind": "panoviz", "type": kind, "in_dim": int(resampler.in_dim), "out_dim": int(resampler.out_dim)}
        if kind == "mlp":
            desc.update(depth=sum(isinstance(m, nn.Linear) for m in resampler.modules()),
                        hidden_dim=int(resampler.hidden_dim))
        elif kind in ("qformer", "perceiver"):
            desc.update(num_queries=int(resampler.num_queries), depth=len(resampler.layers),
                        heads=int(resampler.heads))
        out["resampler"] = desc
    return out
