"""Layer sweep: how cross-view consistency grows through the encoder's and the resampler's layers.

All encoder hidden states come from the one forward the analysis runs anyway
(:func:`~panoviz_callback.features.extract_layers`); the resampler's intermediate outputs are
recorded by forward hooks during its one forward (:class:`OutputCapture`). Per layer, the
overlap metrics of :data:`SWEEP_METRICS` are averaged over the view pairs:

- grid tokens: ``overlap_cosine`` (matched tokens of adjacent views), ``overlap_cka`` and
  ``nn_accuracy`` (the same functions as the analysis' metrics of those names);
- query tokens (no position): ``token_cosine`` (query ``k`` of view ``i`` vs query ``k`` of
  view ``j``) and ``linear_cka``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from panoviz_callback import metrics as _m
from panoviz_callback.correspondence import patch_correspondence

if TYPE_CHECKING:
    from panoviz_callback.views import ViewSet

__all__ = ["SWEEP_METRICS", "LayerSweep", "OutputCapture", "resolve_layers", "encoder_num_states",
           "resampler_layer_modules", "sweep_metrics"]

#: Metric names a sweep may report, in order.
SWEEP_METRICS = ("overlap_cosine", "overlap_cka", "nn_accuracy", "token_cosine", "linear_cka")


@dataclass
class LayerSweep:
    """Per-layer mean metrics of each level.

    Attributes:
        levels: ``{level: {"layers": [label, ...], "metrics": {metric: [value per layer]}}}``;
            encoder labels are hidden-state indices (``0`` = embeddings), resampler labels its
            layer names.
        skipped: ``{level: reason}`` for a level that could not be swept.
    """

    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """``{"LEVEL/layers/LABEL/METRIC": value}`` for every finite value."""
        out = {}
        for level, data in self.levels.items():
            for metric, values in data["metrics"].items():
                for label, value in zip(data["layers"], values, strict=True):
                    if math.isfinite(value):
                        out[f"{level}/layers/{label}/{metric}"] = float(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"levels": {...}, "skipped": {...}}`` (NaN as None)."""
        levels = {
            level: {"layers": list(data["layers"]),
                    "metrics": {m: [v if math.isfinite(v) else None for v in vals]
                                for m, vals in data["metrics"].items()}}
            for level, data in self.levels.items()
        }
        return {"levels": levels, "skipped": dict(self.skipped)}


def encoder_num_states(encoder: Any) -> int | None:
    """Number of hidden states ``L + 1`` of ``encoder`` (embeddings + ``L`` blocks), None if unknown."""
    from panoviz_callback.features import _resolve

    enc = _resolve(encoder)
    n = getattr(enc.config, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n + 1
    base = enc.base
    for name in ("blocks", "layers", "layer"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return len(blocks) + 1
    return None


def resolve_layers(spec: str | Sequence[int], n_states: int | None) -> list[int]:
    """The hidden-state indices of ``spec``: ``"all"`` (``0 .. L``) or a list of indices.

    Negative indices count from the end (``-1`` is hidden state ``L``, the last block before any
    final norm) and are returned as non-negative indices when ``n_states`` is known.

    Raises:
        ValueError: ``"all"`` with an unknown depth, an index out of range, an empty list.
        TypeError: ``spec`` is neither ``"all"`` nor a sequence of ints.
    """
    if isinstance(spec, str):
        if spec != "all":
            raise ValueError(f"Argument `layers` must be 'all' or a list of ints, got {spec!r}.")
        if n_states is None:
            raise ValueError("Argument `layers='all'` needs an encoder whose depth is known (a transformers vision "
                             "model, or a module with `blocks`/`layers`); pass a list of hidden-state indices.")
        return list(range(n_states))
    if not isinstance(spec, Sequence) or not all(isinstance(k, int) and not isinstance(k, bool) for k in spec):
        raise TypeError(f"Expected `layers` to be 'all' or a sequence of ints, got {spec!r}.")
    if not spec:
        raise ValueError("Expected at least one layer in `layers`, got none.")
    out = []
    for k in spec:
        if n_states is not None:
            if not -n_states <= k < n_states:
                raise ValueError(f"Argument `layers` must hold indices in [{-n_states}, {n_states - 1}], got {k}.")
            k = k % n_states
        out.append(k)
    return sorted(set(out))


def resampler_layer_modules(resampler: Any) -> list[tuple[str, nn.Module, bool]]:
    """The resampler's layers whose outputs are token sets ``(V, M, D')``, in order (``[]``: unknown).

    Returns ``[(label, module, residual)]``: the layer's output is the module's output, plus its
    first input when ``residual``. This package's query resamplers: the last feed-forward of each
    layer (``q + ff(q)``); the MLP: its Linear layers; a transformers BERT Q-Former:
    ``encoder.layer``; otherwise the first ``ModuleList`` named ``layers``, ``blocks`` or ``layer``
    (a layer that is a ``ModuleList`` of parts: its last part, residual).
    """
    module = getattr(resampler, "_orig_mod", resampler)
    if not isinstance(module, nn.Module):
        return []
    ours = sys.modules.get("panoviz_callback.models.resamplers")  # not imported: cannot be ours (no lightning import)
    if ours is not None and isinstance(module, ours._QueryResampler):
        return [(str(i), list(layer.values())[-1], True) for i, layer in enumerate(module.layers)]
    if ours is not None and isinstance(module, ours.MLPResampler):
        return [(str(i), m, False) for i, m in enumerate(module.mlp) if isinstance(m, nn.Linear)]
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and name.split(".")[-1] in ("layers", "blocks", "layer") and len(child):
            # a layer that is itself a ModuleList (never called, e.g. Flamingo's [attention, feed-forward]):
            # its last part with the residual ``x + ff(x)``
            return [(str(i), m[-1], True) if isinstance(m, nn.ModuleList) else (str(i), m, False)
                    for i, m in enumerate(child)]
    return []


class OutputCapture:
    """Record the first tensor output of modules during a forward (context manager, hooks removed after).

    Args:
        modules: ``[(label, module, residual)]`` (see :func:`resampler_layer_modules`).
    """

    def __init__(self, modules: list[tuple[str, nn.Module, bool]]) -> None:
        self.modules = list(modules)
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> OutputCapture:
        self.outputs = {}
        for label, module, residual in self.modules:
            self._handles.append(module.register_forward_hook(self._recorder(label, residual)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _recorder(self, label: str, residual: bool) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(tensor, Tensor):
                if residual and args and isinstance(args[0], Tensor) and args[0].shape == tensor.shape:
                    tensor = args[0] + tensor
                self.outputs[label] = tensor.detach()
        return record


def _pair_index(views: ViewSet, device: torch.device) -> tuple[Tensor, Tensor]:
    pairs = list(views.pairs)
    return (torch.tensor([i for i, _ in pairs], device=device, dtype=torch.long),
            torch.tensor([j for _, j in pairs], device=device, dtype=torch.long))


def _mean(values: Tensor) -> float:
    values = values[torch.isfinite(values)]
    return float(values.mean()) if values.numel() else float("nan")


def sweep_metrics(tokens: Tensor, views: ViewSet, grid_hw: tuple[int, int] | None) -> dict[str, float]:
    """Mean over the view pairs of the sweep metrics of one layer.

    Args:
        tokens: ``(V, N, D)`` float32; grid tokens (``N = gh * gw``, no prefix) or queries.
        views: the views (their ``pairs``).
        grid_hw: the token grid, or None for query tokens.

    Returns:
        ``{metric: mean}`` (NaN where no pair is defined).
    """
    if not views.pairs:
        return {}
    idx_i, idx_j = _pair_index(views, tokens.device)
    units = _m._unit(tokens.float())  # (V, N, D)
    if grid_hw is None:
        return {"token_cosine": _mean(_m._token_cosine_views(units, idx_i, idx_j)),
                "linear_cka": _mean(_m._linear_cka_views(_m._cka_grams(tokens.float()), idx_i, idx_j)
                                    if tokens.shape[1] < tokens.shape[2] else
                                    _m._linear_cka_features(tokens.float(), idx_i, idx_j))}
    corr = [patch_correspondence(views, i, j, grid_hw, device=tokens.device) for i, j in views.pairs]
    if not any(len(a) for a, _ in corr):
        return {"overlap_cosine": float("nan")}
    out = {"overlap_cosine": _mean(_m._overlap_cosine_views(units, idx_i, idx_j, [a for a, _ in corr],
                                                            [b for _, b in corr]))}
    out.update(_optional_overlap_metrics(tokens.float(), views, corr, grid_hw))
    return out


def _optional_overlap_metrics(tokens: Tensor, views: ViewSet, corr: list[tuple[Tensor, Tensor]],
                              grid_hw: tuple[int, int]) -> dict[str, float]:
    """``overlap_cka`` / ``nn_accuracy`` per pair when :mod:`panoviz_callback.metrics` has them."""
    out = {}
    calls = {"overlap_cka": lambda fn, a, b, ia, ib: fn(a, b, ia, ib),
             "nn_accuracy": lambda fn, a, b, ia, ib: fn(a, b, ia, ib, grid_hw)}
    for name, call in calls.items():
        fn = getattr(_m, name, None)
        if fn is None:
            continue
        values = [float(call(fn, tokens[i], tokens[j], a, b)) if len(a) else float("nan")
                  for (i, j), (a, b) in zip(views.pairs, corr, strict=True)]
        out[name] = _mean(torch.tensor(values))
    return out
