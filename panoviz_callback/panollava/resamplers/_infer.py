"""Sizes of a PanoLLaVA resampler read from its weights (a state dict already sliced to the resampler)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["_infer", "_is_mlp_fallback"]


def _shape(sd: Mapping[str, Tensor], key: str, rtype: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"Expected the key {key!r} in the {rtype} resampler's weights, found "
                         f"{', '.join(sorted(sd)[:6]) or 'no keys'}{' ...' if len(sd) > 6 else ''}.")
    return tuple(int(s) for s in sd[key].shape)


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.fullmatch(k))})


def _is_mlp_fallback(sd: Mapping[str, Tensor] | None) -> bool:
    """Whether a ``bimamba`` checkpoint holds the MLP PanoLLaVA substituted when ``mamba_ssm`` was missing."""
    return sd is not None and any(k.startswith("mlp.") for k in sd) and not any(k.startswith("blocks.") for k in sd)


def _proj_depth(sd: Mapping[str, Tensor]) -> int:
    if "proj.weight" in sd:
        return 0
    return sum(1 for i in _indices(sd, r"proj\.(\d+)\.weight") if sd[f"proj.{i}.weight"].ndim == 2)


def _infer(rtype: str, sd: Mapping[str, Tensor]) -> tuple[dict[str, Any], int, int]:
    """Return ``(options, in_dim, out_dim)`` that the weights ``sd`` fix for ``rtype``."""
    if rtype == "mlp":
        idx = _indices(sd, r"mlp\.(\d+)\.weight")
        linear = [i for i in idx if sd[f"mlp.{i}.weight"].ndim == 2]
        if not linear:
            _shape(sd, "mlp.0.weight", rtype)
        first, last = _shape(sd, f"mlp.{linear[0]}.weight", rtype), _shape(sd, f"mlp.{linear[-1]}.weight", rtype)
        opts = {"depth": len(linear), "use_ln": len(idx) > len(linear),
                "hidden_dim": first[0] if len(linear) > 1 else None}
        return opts, first[1], last[0]
    if rtype in ("identity", "avg"):
        out, ind = _shape(sd, "proj.weight", rtype)
        return {}, ind, out
    if rtype == "conv":
        out = _shape(sd, "head.weight", rtype)[0]
        ind = _shape(sd, "input_proj.weight", rtype)[1] if "input_proj.weight" in sd else out
        repeats = _indices(sd, r"repeated_stages\.(\d+)\..*")
        stages = _indices(sd, r"repeated_stages\.0\.(\d+)\..*")
        depths = [len(_indices(sd, rf"repeated_stages\.0\.{s}\.(\d+)\..*")) for s in stages]
        return {"depths": depths, "num_repeats": max(len(repeats), 1)}, ind, out
    if rtype == "qformer":
        _, q, ind = _shape(sd, "query", rtype)
        layers = _indices(sd, r"bert\.encoder\.layer\.(\d+)\.attention\.self\.query\.weight")
        return {"num_queries": q, "num_hidden_layers": len(layers)}, ind, _shape(sd, "proj.weight", rtype)[0]
    if rtype == "perceiver":
        q, dim = _shape(sd, "perceiver.latents", rtype)
        layers = _indices(sd, r"perceiver\.layers\.(\d+)\.0\.to_q\.weight")
        inner = _shape(sd, "perceiver.layers.0.0.to_q.weight", rtype)[0] if layers else None
        ff = f"perceiver.layers.{layers[0] if layers else 0}.1.1.weight"
        ff_mult = _shape(sd, ff, rtype)[0] // dim if ff in sd else 0
        out = _shape(sd, "proj.weight", rtype)[0] if "proj.weight" in sd else dim
        return {"num_latents": q, "depth": len(layers), "ff_mult": ff_mult, "_inner": inner}, dim, out
    if rtype == "spatial_pool":
        opts: dict[str, Any] = {"depth": _proj_depth(sd)}
        if "pool.weight" in sd:
            opts.update(pool_mode="conv", pool_size=_shape(sd, "pool.weight", rtype)[-1])
        return opts, *_proj_dims(sd, rtype, opts["depth"])
    if rtype == "masked_drop":
        depth = _proj_depth(sd)
        return {"depth": depth}, *_proj_dims(sd, rtype, depth)
    if rtype == "c_abstractor":
        hd, ind = _shape(sd, "input_proj.weight", rtype)
        depth = len(_indices(sd, r"stage1\.(\d+)\.dwconv\.weight"))
        block = "stage1.0" if depth else "stage2.0"
        readout = [i for i in _indices(sd, r"readout\.(\d+)\.weight")]
        opts = {"hidden_dim": hd, "depth": depth, "mlp_depth": len(readout)}
        if f"{block}.dwconv.weight" in sd:
            opts.update(kernel_size=_shape(sd, f"{block}.dwconv.weight", rtype)[-1],
                        expand=_shape(sd, f"{block}.pw1.weight", rtype)[0] // hd,
                        se_mid=_shape(sd, f"{block}.se.fc.0.weight", rtype)[0])
        return opts, ind, _shape(sd, f"readout.{readout[-1] if readout else 0}.weight", rtype)[0]
    if rtype == "bimamba":
        hd, ind = _shape(sd, "input_proj.weight", rtype)
        blocks = _indices(sd, r"blocks\.(\d+)\.norm\.weight")
        opts = {"hidden_dim": hd, "num_layers": len(blocks)}
        if blocks:
            e, s = _shape(sd, "blocks.0.forward_block.A_log", rtype)
            opts.update(d_state=s, d_inner=e, d_conv=_shape(sd, "blocks.0.forward_block.conv1d.weight", rtype)[-1],
                        dt_rank=_shape(sd, "blocks.0.forward_block.dt_proj.weight", rtype)[1])
        return opts, ind, _shape(sd, "output_proj.weight", rtype)[0]
    raise ValueError(f"No weight reader for resampler type {rtype!r}.")


def _proj_dims(sd: Mapping[str, Tensor], rtype: str, depth: int) -> tuple[int, int]:
    if depth == 0:
        out, ind = _shape(sd, "proj.weight", rtype)
        return ind, out
    linear = [i for i in _indices(sd, r"proj\.(\d+)\.weight") if sd[f"proj.{i}.weight"].ndim == 2]
    return _shape(sd, f"proj.{linear[0]}.weight", rtype)[1], _shape(sd, f"proj.{linear[-1]}.weight", rtype)[0]
