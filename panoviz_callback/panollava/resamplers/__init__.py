"""PanoLLaVA's resamplers, rebuilt so that its checkpoints' weights load strictly.

:func:`build_panollava_resampler` builds the resampler a PanoLLaVA model at a given revision
built for ``resampler_type`` and its config, with sizes taken from the weights when given.
Each module maps **all** encoder tokens ``(V, N, D)`` (CLS and registers included, as
PanoLLaVA feeds them) to ``(V, M, latent_dim)`` and reports its ``layout`` (``"grid"`` or
``"queries"``) and :meth:`~PanoResampler.output_grid`.

Revisions: ``"head"`` (``cora`` package, also ``"aa3e2ae"``), ``"dc64bc5"`` and ``"7227614"``
(``panovlm``). Types per revision are in :data:`RESAMPLER_TYPES`; PanoLLaVA's aliases
(``bidirectional_mamba``, ``bi_mamba``; ``cabstractor`` at HEAD) are accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from panoviz_callback.panollava.resamplers._base import PanoResampler
from panoviz_callback.panollava.resamplers._config import _options
from panoviz_callback.panollava.resamplers._infer import _infer, _is_mlp_fallback
from panoviz_callback.panollava.resamplers.bimamba import (
    BiMambaResampler,
    MambaMixer,
    selective_scan,
)
from panoviz_callback.panollava.resamplers.c_abstractor import CAbstractorResampler
from panoviz_callback.panollava.resamplers.mlp import MLPResampler
from panoviz_callback.panollava.resamplers.perceiver import PerceiverResampler
from panoviz_callback.panollava.resamplers.pooling import (
    AvgPoolResampler,
    ConvResampler,
    IdentityResampler,
    MaskedDropResampler,
    SpatialPoolResampler,
)
from panoviz_callback.panollava.resamplers.qformer import QFormerResampler

__all__ = [
    "RESAMPLER_TYPES",
    "build_panollava_resampler",
    "canonical_resampler_type",
    "PanoResampler",
    "MLPResampler",
    "QFormerResampler",
    "PerceiverResampler",
    "SpatialPoolResampler",
    "MaskedDropResampler",
    "CAbstractorResampler",
    "AvgPoolResampler",
    "ConvResampler",
    "IdentityResampler",
    "BiMambaResampler",
    "MambaMixer",
    "selective_scan",
]

RESAMPLER_TYPES: dict[str, tuple[str, ...]] = {
    "head": ("mlp", "bimamba", "qformer", "perceiver", "spatial_pool", "masked_drop", "c_abstractor", "identity",
             "avg", "conv"),
    # its schema also lists "perceiver", but its ResamplerModule refuses it: no checkpoint can hold one
    "dc64bc5": ("mlp", "bimamba", "qformer"),
    # its schema also lists "perceiver", but PanoramaVLM builds only "mlp"
    "7227614": ("mlp",),
}
_ALIASES = {
    "head": {"bidirectional_mamba": "bimamba", "bi_mamba": "bimamba", "cabstractor": "c_abstractor"},
    "dc64bc5": {"bidirectional_mamba": "bimamba", "bi_mamba": "bimamba"},
    "7227614": {},
}
_REVISIONS = {"head": "head", "aa3e2ae": "head", "dc64bc5": "dc64bc5", "7227614": "7227614"}
_CLASSES: dict[str, type[PanoResampler]] = {
    "mlp": MLPResampler, "bimamba": BiMambaResampler, "qformer": QFormerResampler, "perceiver": PerceiverResampler,
    "spatial_pool": SpatialPoolResampler, "masked_drop": MaskedDropResampler, "c_abstractor": CAbstractorResampler,
    "identity": IdentityResampler, "avg": AvgPoolResampler, "conv": ConvResampler,
}


def canonical_resampler_type(resampler_type: str, revision: str = "head") -> str:
    """PanoLLaVA's canonical name for ``resampler_type`` at ``revision``.

    Raises:
        ValueError: an unknown revision, or a type that revision does not build.
    """
    rev = _REVISIONS.get(str(revision).lower())
    if rev is None:
        raise ValueError(f"Unknown PanoLLaVA revision {revision!r}; supported: {', '.join(_REVISIONS)}.")
    name = str(resampler_type).lower()
    name = _ALIASES[rev].get(name, name)
    if name not in RESAMPLER_TYPES[rev]:
        raise ValueError(f"Resampler type {resampler_type!r} is not one PanoLLaVA builds at revision {rev!r}; "
                         f"supported: {', '.join(RESAMPLER_TYPES[rev])}.")
    return name


def build_panollava_resampler(
    resampler_type: str, *, vision_dim: int, latent_dim: int, config: Mapping[str, Any] | None = None,
    revision: str = "head", state_dict: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """Build the resampler PanoLLaVA at ``revision`` built, in eval mode (weights not loaded).

    Options come from ``config`` with PanoLLaVA's defaults for that revision; every size the
    weights fix (depth, widths, number of queries, state sizes, ``use_ln``, ...) is read from
    ``state_dict`` when given, so that ``module.load_state_dict(state_dict, strict=True)``
    works. A ``bimamba`` checkpoint whose weights are an MLP (PanoLLaVA falls back to its MLP
    when ``mamba_ssm`` is missing) gets that MLP.

    Args:
        resampler_type: PanoLLaVA's ``resampler_type`` (aliases accepted).
        vision_dim: the encoder's hidden size ``D``.
        latent_dim: PanoLLaVA's ``latent_dimension``.
        config: PanoLLaVA's ``resampler_config`` mapping and/or its flat ``resampler_*``
            hyper-parameters (a nested ``"resampler_config"`` key is read as such), plain data.
        revision: ``"head"``, ``"dc64bc5"`` or ``"7227614"``.
        state_dict: the resampler's weights, keys without the checkpoint prefix
            (``model.resampler_module.resampler.`` / ``model.resampler.``).

    Returns:
        A :class:`PanoResampler` in eval mode: ``(V, N, vision_dim) -> (V, M, latent_dim)``; its
        ``panollava_type`` is the canonical type asked for (``"bimamba"`` also for the MLP fallback).

    Raises:
        ValueError: an unknown type or revision, a missing weight the sizes are read from, or
            weights whose input / output sizes differ from ``vision_dim`` / ``latent_dim``.

    Example:
        >>> import torch
        >>> m = build_panollava_resampler("mlp", vision_dim=8, latent_dim=4, config={"depth": 2})
        >>> m(torch.rand(2, 5, 8)).shape, m.layout
        (torch.Size([2, 5, 4]), 'grid')
    """
    rtype = canonical_resampler_type(resampler_type, revision)
    rev = _REVISIONS[str(revision).lower()]
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"Expected `config` to be a mapping, got {type(config).__name__}.")
    if state_dict is not None and not (isinstance(state_dict, Mapping)
                                       and all(isinstance(t, Tensor) for t in state_dict.values())):
        raise TypeError("Expected `state_dict` to be a mapping of names to tensors.")
    built = rtype
    if rtype == "bimamba" and _is_mlp_fallback(state_dict):
        built, opts = "mlp", _options("bimamba_fallback", rev, config)
    else:
        opts = _options(rtype, rev, config)
    if state_dict is not None:
        inferred, in_dim, out_dim = _infer(built, state_dict)
        _check_dims(rtype, in_dim, out_dim, vision_dim, latent_dim)
        inner = inferred.pop("_inner", None)
        opts.update(inferred)
        if inner is not None:  # perceiver: heads from the config, width per head from the weights
            if inner % opts["heads"]:
                raise ValueError(f"The perceiver's attention width {inner} is not divisible by its "
                                 f"{opts['heads']} heads (`heads` in the config).")
            opts["dim_head"] = inner // opts["heads"]
    _check_caps(rtype, opts, vision_dim, latent_dim)
    module = _CLASSES[built](int(vision_dim), int(latent_dim), **opts)
    module.panollava_type = rtype  # type: ignore[assignment]
    return module.eval()


_MAX_SIZE = 1 << 16  # no config value may size a layer beyond this (a file is data, not an allocation order)
_MAX_DEPTH = 256


def _check_caps(rtype: str, opts: Mapping[str, Any], vision_dim: int, latent_dim: int) -> None:
    sizes = {"vision_dim": vision_dim, "latent_dim": latent_dim, **opts}
    for key, value in sizes.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            cap = _MAX_DEPTH if key in ("depth", "depths", "num_layers", "num_hidden_layers", "mlp_depth") else _MAX_SIZE
            if item < 0 or item > cap:
                raise ValueError(f"The {rtype} resampler's `{key}` is {item}, outside 0..{cap}.")
    if rtype == "qformer" and opts.get("num_queries", 0) > 512:
        raise ValueError(f"The qformer resampler's {opts['num_queries']} queries exceed BERT's 512 positions.")


def _check_dims(rtype: str, in_dim: int, out_dim: int, vision_dim: int, latent_dim: int) -> None:
    if in_dim != int(vision_dim):
        raise ValueError(f"The {rtype} resampler's weights take {in_dim}-dim tokens, but the encoder's hidden size "
                         f"is {vision_dim}.")
    if out_dim != int(latent_dim):
        raise ValueError(f"The {rtype} resampler's weights give {out_dim}-dim tokens, but `latent_dimension` "
                         f"is {latent_dim}.")
