"""PanoLLaVA's resampler options per revision: which keys it reads, and their defaults.

Each reader takes the plain-dict config (a ``resampler_config`` mapping, the flat training
hyper-parameters, or both: flat keys beside a nested ``"resampler_config"``) and returns the
keyword arguments of this package's resampler class, with PanoLLaVA's defaults for that revision.
Sizes that the checkpoint's weights fix are overridden later by :mod:`._infer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["_options"]

# dc64bc5 `RESAMPLER_CONFIGS` (the defaults when the config has no `resampler_config`).
_DC_AUTO = {
    "mlp": {"depth": 3, "hidden_dim": 1536, "use_ln": True},
    "bimamba": {"depth": 4, "hidden_dim": 1024, "d_state": 64, "d_conv": 4, "expand": 1.75, "norm_first": True,
                "dropout": 0.05},
    "qformer": {"depth": 6, "hidden_dim": 768, "num_query_tokens": 64, "num_hidden_layers": 6},
}
# dc64bc5 pydantic defaults (when a `resampler_config` dict is given).
_DC_TYPED = {
    "mlp": {"depth": 2, "hidden_dim": 1536, "use_ln": True},
    "bimamba": {"depth": 2, "hidden_dim": 768, "d_state": 64, "d_conv": 4, "expand": 2.0, "norm_first": True,
                "dropout": 0.1},
    "qformer": {"depth": 2, "hidden_dim": 768, "num_query_tokens": 64, "num_hidden_layers": 6},
}
# dc64bc5 flat ModelConfig fields and the resampler_config key each one feeds.
_DC_FLAT = {"resampler_depth": "depth", "resampler_hidden_dim": "hidden_dim", "resampler_use_ln": "use_ln",
            "resampler_dropout": "dropout", "resampler_num_query_tokens": "num_query_tokens",
            "resampler_num_hidden_layers": "num_hidden_layers"}


def _nested(config: Mapping[str, Any]) -> dict[str, Any] | None:
    inner = config.get("resampler_config")
    return dict(inner) if isinstance(inner, Mapping) else None


def _head(rtype: str, config: Mapping[str, Any]) -> dict[str, Any]:
    rc = _nested(config)
    rc = dict(config) if rc is None else rc
    g = rc.get
    if rtype == "mlp":
        return {"hidden_dim": g("hidden_dim"), "depth": int(g("depth", 3)), "use_ln": bool(g("use_ln", True)),
                "pool_tokens": g("pool_tokens"), "pool_type": str(g("pool_type", "avg"))}
    if rtype == "bimamba":
        return {"hidden_dim": g("hidden_dim"), "num_layers": int(g("num_layers", g("depth", 4))),
                "d_state": int(g("d_state", 64)), "d_conv": int(g("d_conv", 4)), "expand": float(g("expand", 2.0)),
                "dropout": float(g("dropout", 0.0)), "norm_first": bool(g("norm_first", True))}
    if rtype == "bimamba_fallback":  # HEAD without mamba_ssm: MLP(depth = num_layers or depth or 3)
        return {"depth": int(g("num_layers", g("depth", 3)))}
    if rtype == "qformer":
        return {"num_queries": int(g("num_query_tokens", 64)), "num_hidden_layers": int(g("num_hidden_layers", 6)),
                "num_attention_heads": int(g("num_attention_heads", 8))}
    if rtype == "conv":
        return {"num_tokens": int(g("num_tokens", 144)), "depths": list(g("depths", [2, 2]))}
    if rtype == "perceiver":
        return {"num_latents": int(g("num_latents", 64)), "depth": int(g("depth", 6)), "heads": int(g("heads", 8)),
                "dim_head": int(g("dim_head", 64)), "ff_mult": int(g("ff_mult", 4))}
    if rtype == "spatial_pool":
        return {"pool_size": int(g("pool_size", 4)), "pool_mode": str(g("pool_mode", "average")),
                "depth": int(g("depth", 2))}
    if rtype == "masked_drop":
        return {"mask_ratio": float(g("mask_ratio", 0.5)), "mask_mode": str(g("mask_mode", "fixed")),
                "skip_percentage": float(g("skip_percentage", 0.0)), "ratio_lower": float(g("ratio_lower", 0.3)),
                "ratio_upper": float(g("ratio_upper", 0.7)), "depth": int(g("depth", 2))}
    if rtype == "c_abstractor":
        return {"hidden_dim": g("hidden_dim"), "depth": int(g("depth", 3)), "num_queries": int(g("num_queries", 0)),
                "kernel_size": int(g("kernel_size", 7)), "expand": int(g("expand", 4)),
                "se_reduction": int(g("se_reduction", 4)), "mlp_depth": int(g("mlp_depth", 2))}
    return {}  # identity, avg


def _dc64bc5(rtype: str, config: Mapping[str, Any]) -> dict[str, Any]:
    base = "bimamba" if rtype == "bimamba_fallback" else rtype
    nested = _nested(config)
    merged = dict((_DC_AUTO if nested is None else _DC_TYPED)[base])
    for flat, key in _DC_FLAT.items():
        if config.get(flat) is not None:
            merged[key] = config[flat]
    if nested is not None:
        if "num_layers" in nested:  # its BiMamba / QFormer configs alias num_layers
            nested.setdefault("num_hidden_layers" if base == "qformer" else "depth", nested.pop("num_layers"))
        merged.update({k: v for k, v in nested.items() if v is not None})
    g = merged.get
    if rtype == "mlp":
        return {"hidden_dim": g("hidden_dim"), "depth": int(g("depth", 3)), "use_ln": bool(g("use_ln", True))}
    if rtype == "bimamba":
        return {"hidden_dim": g("hidden_dim"), "num_layers": int(g("depth", 4)), "d_state": int(g("d_state", 64)),
                "d_conv": int(g("d_conv", 4)), "expand": float(g("expand", 2.0)), "dropout": float(g("dropout", 0.0)),
                "norm_first": bool(g("norm_first", True))}
    if rtype == "bimamba_fallback":  # dc64bc5 without mamba_ssm: MLP(hidden_dim, depth 3, use_ln True)
        return {"hidden_dim": g("hidden_dim"), "depth": 3, "use_ln": True}
    # qformer: heads are fixed at 8 in this revision's QFormerResampler
    return {"num_queries": int(g("num_query_tokens", 64)), "num_hidden_layers": int(g("num_hidden_layers", 6)),
            "num_attention_heads": 8}


def _r7227614(rtype: str, config: Mapping[str, Any]) -> dict[str, Any]:
    g = config.get
    depth = g("resampler_depth")
    use_ln = g("resampler_use_ln")
    return {"hidden_dim": g("resampler_hidden_dim"), "depth": 2 if depth is None else int(depth),
            "use_ln": True if use_ln is None else bool(use_ln)}


_READERS = {"head": _head, "dc64bc5": _dc64bc5, "7227614": _r7227614}


def _options(rtype: str, revision: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The constructor options PanoLLaVA at ``revision`` derives from ``config`` for ``rtype``."""
    return _READERS[revision](rtype, {} if config is None else config)
