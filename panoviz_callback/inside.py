"""Looking inside (opt-in): query and encoder attention on the sphere, the layer sweep, agreement panoramas.

:class:`InsideOptions` says what to compute; :class:`~panoviz_callback.analysis.Analyzer`
(``inside=...``) runs an :class:`InsideProbe` around its own encoder and resampler forwards
(hooks record what is needed, no extra forward) and attaches an :class:`InsideResult` to the
:class:`~panoviz_callback.analysis.AnalysisResult`. Pictures: :mod:`panoviz_callback.inside_render`.

Scalars (``AnalysisResult.scalars()``, logged as ``panoviz/...``):

- ``resampled/attention_entropy``: mean normalised entropy of the queries' cross-attention
  (0 = each query looks at one token, 1 = uniform);
- ``resampled/query_agreement``: mean over view pairs of
  :func:`~panoviz_callback.agreement.query_agreement` (1 = every query looks at the same scene
  points in both views of a pair);
- ``vision_encoder/attention_entropy``: the same for the encoder's CLS / probe / mean attention;
- ``LEVEL/layers/LABEL/METRIC``: the layer sweep (:class:`~panoviz_callback.layers.LayerSweep`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from panoviz_callback._checks import _check_int
from panoviz_callback.agreement import agreement_panorama, attention_entropy, query_agreement
from panoviz_callback.attention import AttentionCapture, _select, encoder_attention_site, query_attention_sites
from panoviz_callback.correspondence import stitch_equirect
from panoviz_callback.features import TokenFeatures
from panoviz_callback.layers import (
    SWEEP_METRICS, LayerSweep, OutputCapture, encoder_num_states, resampler_layer_modules, resolve_layers,
    sweep_metrics,
)

__all__ = ["InsideOptions", "InsideProbe", "InsideResult", "QueryAttention", "EncoderAttention"]

_SKIPPABLE = (ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError)


@dataclass(frozen=True)
class InsideOptions:
    """What to look at inside the model (everything off by default).

    Attributes:
        attention: query attention maps of a query-token resampler and the encoder's CLS /
            probe / mean attention.
        attention_layer: which cross-attention layer of the resampler (``-1``: the last).
        layers: the layer sweep: ``None`` (off), ``"all"`` or hidden-state indices.
        agreement: the per-token agreement panorama of every level with a token grid.
        top_queries: queries drawn in the figures (the most focused ones).
        pano_hw: ``(H, W)`` of the sphere maps and agreement panoramas.
    """

    attention: bool = False
    attention_layer: int = -1
    layers: str | tuple[int, ...] | None = None
    agreement: bool = False
    top_queries: int = 8
    pano_hw: tuple[int, int] = (128, 256)

    def __post_init__(self) -> None:
        for name in ("attention", "agreement"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Expected `{name}` to be a bool, got {type(getattr(self, name)).__name__}.")
        _check_int(self.attention_layer, "attention_layer")
        _check_int(self.top_queries, "top_queries", 1)
        if self.layers is not None:
            if isinstance(self.layers, str):
                if self.layers != "all":
                    raise ValueError(f"Argument `layers` must be None, 'all' or a list of ints, got {self.layers!r}.")
            else:
                resolve_layers(list(self.layers), None)  # type and emptiness checks
                object.__setattr__(self, "layers", tuple(int(k) for k in self.layers))
        if len(self.pano_hw) != 2:
            raise ValueError(f"Expected `pano_hw` of shape (H, W), got {self.pano_hw!r}.")
        for side in self.pano_hw:
            _check_int(side, "pano_hw", 2)
        object.__setattr__(self, "pano_hw", tuple(int(s) for s in self.pano_hw))

    @property
    def enabled(self) -> bool:
        """True when any part is on."""
        return self.attention or self.agreement or self.layers is not None

    @classmethod
    def from_value(cls, value: Any) -> InsideOptions | None:
        """``None`` / ``False``: off; ``True``: everything (``layers="all"``); a dict or an ``InsideOptions``."""
        if value is None or value is False:
            return None
        if value is True:
            return cls(attention=True, layers="all", agreement=True)
        if isinstance(value, cls):
            return value if value.enabled else None
        if isinstance(value, Mapping):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"Unknown `inside` options {sorted(unknown)}; expected some of "
                                 f"{sorted(cls.__dataclass_fields__)}.")
            opts = cls(**{k: (tuple(v) if k == "pano_hw" else v) for k, v in value.items()})
            return opts if opts.enabled else None
        raise TypeError(f"Expected `inside` to be None, a bool, a dict or InsideOptions, got {type(value).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for checkpoints and reports)."""
        d = asdict(self)
        d["layers"] = d["layers"] if d["layers"] is None or isinstance(d["layers"], str) else list(d["layers"])
        d["pano_hw"] = list(d["pano_hw"])
        return d


@dataclass
class QueryAttention:
    """Cross-attention of the resampler's queries over the encoder's patch tokens.

    Attributes:
        attn: ``(V, Q, N)`` head-averaged, each row sums to 1 over the ``N = gh * gw`` tokens.
        grid_hw: ``(gh, gw)``.
        sphere: ``(Q, H, W)`` each query's attention projected on the equirectangular panorama.
        covered: ``(H, W)`` bool, pixels some non-global view sees.
        entropy: ``(Q,)`` normalised entropy, averaged over views.
        agreement: ``(P,)`` query agreement per view pair (NaN: no overlap).
        site: the attention module read; ``layer`` its index among the cross-attention calls.
    """

    attn: Tensor
    grid_hw: tuple[int, int]
    sphere: Tensor
    covered: Tensor
    entropy: Tensor
    agreement: Tensor
    site: str
    layer: int

    def top(self, k: int) -> list[int]:
        """The ``k`` most focused queries (lowest entropy), in query order."""
        k = min(k, self.entropy.numel())
        return sorted(torch.topk(-self.entropy, k).indices.tolist())


@dataclass
class EncoderAttention:
    """One attention map per view from the encoder (DINO-style).

    Attributes:
        attn: ``(V, N)`` over the patch tokens, sums to 1 per view.
        grid_hw: ``(gh, gw)``.
        kind: ``"probe"`` (MAP head), ``"cls"`` or ``"mean"`` (attention received).
        sphere: ``(H, W)`` stitched on the panorama; ``covered`` ``(H, W)`` bool.
        entropy: ``(V,)`` normalised entropy.
    """

    attn: Tensor
    grid_hw: tuple[int, int]
    kind: str
    sphere: Tensor
    covered: Tensor
    entropy: Tensor


@dataclass
class InsideResult:
    """What :class:`InsideProbe` found; absent parts are None (``skipped`` says why when they were asked for)."""

    options: InsideOptions
    query_attention: QueryAttention | None = None
    encoder_attention: EncoderAttention | None = None
    layer_sweep: LayerSweep | None = None
    agreement: dict[str, Tensor] = field(default_factory=dict)  # {level: (H, W) cosine, NaN where no overlap}
    skipped: dict[str, str] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """``{"LEVEL/NAME": value}`` (finite values only)."""
        out: dict[str, float] = {}
        qa = self.query_attention
        if qa is not None:
            out["resampled/attention_entropy"] = float(qa.entropy.mean())
            finite = qa.agreement[torch.isfinite(qa.agreement)]
            if finite.numel():
                out["resampled/query_agreement"] = float(finite.mean())
        if self.encoder_attention is not None:
            out["vision_encoder/attention_entropy"] = float(self.encoder_attention.entropy.mean())
        if self.layer_sweep is not None:
            out.update(self.layer_sweep.scalars())
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary for ``similarity_NAME.json`` (``"inside"`` entry)."""
        d: dict[str, Any] = {"options": self.options.to_dict(), "skipped": dict(self.skipped)}
        qa = self.query_attention
        if qa is not None:
            d["query_attention"] = {
                "site": qa.site, "layer": qa.layer, "num_queries": int(qa.attn.shape[1]),
                "entropy_per_query": [round(float(v), 6) for v in qa.entropy],
                "agreement_per_pair": [float(v) if math.isfinite(v) else None for v in qa.agreement.tolist()],
            }
        if self.encoder_attention is not None:
            ea = self.encoder_attention
            d["encoder_attention"] = {"kind": ea.kind, "entropy_per_view": [round(float(v), 6) for v in ea.entropy]}
        if self.layer_sweep is not None:
            d["layer_sweep"] = self.layer_sweep.to_dict()
        if self.agreement:
            d["agreement_panorama"] = {
                level: {"mean": _finite_mean(pano), "covered_fraction": float(torch.isfinite(pano).float().mean())}
                for level, pano in self.agreement.items()}
        d["scalars"] = self.scalars()
        return d


def _finite_mean(x: Tensor) -> float | None:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else None


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class InsideProbe:
    """Runs around one analysis: hooks during the forwards, the maps and sweeps afterwards.

    Args:
        options: what to compute.
    """

    def __init__(self, options: InsideOptions) -> None:
        self.options = options
        self.skipped: dict[str, str] = {}
        self._encoder_capture: AttentionCapture | None = None
        self._encoder_kind: str | None = None
        self._query_capture: AttentionCapture | None = None
        self._resampler_layers: OutputCapture | None = None

    def encoder_layers(self, encoder: Any) -> list[int]:
        """Hidden-state indices the sweep needs from the encoder forward (``[]`` when off or impossible)."""
        if self.options.layers is None:
            return []
        try:
            spec = self.options.layers if isinstance(self.options.layers, str) else list(self.options.layers)
            return resolve_layers(spec, encoder_num_states(encoder))
        except (ValueError, TypeError) as err:
            self.skipped["layer_sweep"] = _reason(err)
            return []

    @contextlib.contextmanager
    def encoder_forward(self, encoder: Any) -> Iterator[None]:
        """Record the encoder attention inputs during the encoder forward."""
        self._encoder_capture = None
        if self.options.attention:
            found = encoder_attention_site(encoder)
            if isinstance(found, str):
                self.skipped["encoder_attention"] = found
            else:
                site, self._encoder_kind = found
                self._encoder_capture = AttentionCapture([site])
        with self._encoder_capture or contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def resampler_forward(self, resampler: Any) -> Iterator[None]:
        """Record the resampler's cross-attention inputs and layer outputs during its forward."""
        self._query_capture = self._resampler_layers = None
        if self.options.attention:
            sites = query_attention_sites(resampler)
            if sites:
                self._query_capture = AttentionCapture(sites)
            elif getattr(resampler, "output_layout", None) == "queries" or getattr(resampler, "num_queries", None):
                self.skipped["query_attention"] = (f"no attention adapter knows {type(resampler).__name__} "
                                                   "(see attention.register_query_adapter)")
        if self.options.layers is not None:
            modules = resampler_layer_modules(resampler)
            if modules:
                self._resampler_layers = OutputCapture(modules)
            else:
                self.skipped["layer_sweep/resampled"] = f"{type(resampler).__name__} exposes no layer list"
        with contextlib.ExitStack() as stack:
            for cap in (self._query_capture, self._resampler_layers):
                if cap is not None:
                    stack.enter_context(cap)
            yield

    def finish(self, views: Any, hidden: Mapping[int, TokenFeatures], resampler_input: TokenFeatures | None,
               levels: Mapping[str, TokenFeatures], sweep_layers: Sequence[int]) -> InsideResult:
        """Compute the maps, the sweep and the agreement panoramas (float32, autocast off).

        Args:
            views: the analysed :class:`~panoviz_callback.views.ViewSet`.
            hidden: ``{layer: TokenFeatures}`` from the one encoder forward.
            resampler_input: the patch tokens the resampler read (None without a resampler).
            levels: ``{level: TokenFeatures}`` of the analysis.
            sweep_layers: the hidden-state indices of the sweep.
        """
        result = InsideResult(options=self.options, skipped=self.skipped)
        opts = self.options
        if self._query_capture is not None and resampler_input is not None:
            try:
                result.query_attention = self._query_attention(views, resampler_input)
            except _SKIPPABLE as err:
                result.skipped["query_attention"] = _reason(err)
        if self._encoder_capture is not None:
            try:
                result.encoder_attention = self._encoder_attention(views, hidden)
            except _SKIPPABLE as err:
                result.skipped["encoder_attention"] = _reason(err)
        if opts.layers is not None and sweep_layers:
            try:
                result.layer_sweep = self._sweep(views, hidden, sweep_layers, levels)
            except _SKIPPABLE as err:
                result.skipped["layer_sweep"] = _reason(err)
        if opts.agreement:
            for name, feats in levels.items():
                grid = _grid_tokens(feats)
                if grid is None:
                    result.skipped[f"agreement/{name}"] = "query tokens have no position on the sphere"
                    continue
                result.agreement[name] = agreement_panorama(grid[0], views, grid[1], opts.pano_hw)
        return result

    def _query_attention(self, views: Any, tokens_in: TokenFeatures) -> QueryAttention:
        grid = tokens_in.grid_hw
        if grid is None:
            raise ValueError("the resampler input has no token grid")
        named = self._query_capture.named_weights()
        weights, names = [w for _, w in named], [n for n, _ in named]
        layer = self.options.attention_layer
        n = grid[0] * grid[1]
        offset = tokens_in.tokens.shape[1] - n  # prefix tokens an `input_tokens = "all"` resampler reads first
        attn = _select(weights, layer, n, offset)  # (V, Q, N)
        maps = attn.reshape(attn.shape[0], attn.shape[1], *grid)  # (V, Q, gh, gw)
        sphere, covered = stitch_equirect(maps, views, self.options.pano_hw)
        return QueryAttention(
            attn=attn, grid_hw=grid, sphere=sphere, covered=covered,
            entropy=attention_entropy(attn).mean(0), agreement=query_agreement(attn, views, grid),
            site=names[layer], layer=layer % len(weights),
        )

    def _encoder_attention(self, views: Any, hidden: Mapping[int, TokenFeatures]) -> EncoderAttention:
        weights = self._encoder_capture.weights()
        if not weights:
            raise ValueError("the encoder's attention module was not called")
        w = weights[-1].mean(1)  # (V, Qa, K): heads averaged
        feats = next(iter(hidden.values()))
        grid, prefix = feats.grid_hw, feats.num_prefix_tokens
        n = grid[0] * grid[1]
        if self._encoder_kind == "mean":
            row = w.mean(1)  # (V, K)
        else:
            row = w[:, 0]  # (V, K): the probe's or the CLS token's attention
        if row.shape[-1] == n + prefix:
            row = row[:, prefix:]
        if row.shape[-1] != n:
            raise ValueError(f"the attention covers {row.shape[-1]} tokens, the grid {grid} has {n}")
        attn = row / row.sum(-1, keepdim=True).clamp_min(1e-12)  # (V, N)
        sphere, covered = stitch_equirect(attn.reshape(-1, 1, *grid), views, self.options.pano_hw)
        return EncoderAttention(attn=attn, grid_hw=grid, kind=self._encoder_kind, sphere=sphere[0], covered=covered,
                                entropy=attention_entropy(attn))

    def _sweep(self, views: Any, hidden: Mapping[int, TokenFeatures], layers: Sequence[int],
               levels: Mapping[str, TokenFeatures]) -> LayerSweep:
        sweep = LayerSweep(skipped={k.split("/", 1)[1]: v for k, v in self.skipped.items()
                                    if k.startswith("layer_sweep/")})
        rows = []
        for k in layers:
            grid = _grid_tokens(hidden[k])
            rows.append({} if grid is None else sweep_metrics(grid[0], views, grid[1]))
        sweep.levels["vision_encoder"] = _table([str(k) for k in layers], rows)
        if self._resampler_layers is not None and self._resampler_layers.outputs and "resampled" in levels:
            final = levels["resampled"]
            labels, rows = [], []
            n_in = next(iter(hidden.values())).grid_hw
            for label, _, _ in self._resampler_layers.modules:
                out = self._resampler_layers.outputs.get(label)
                if out is None or out.dim() != 3 or out.shape[0] != len(views):
                    continue
                tokens = out.float()
                if final.layout == "queries":
                    grid = None
                elif n_in is not None and tokens.shape[1] == n_in[0] * n_in[1]:
                    grid = n_in
                elif final.grid_hw is not None and tokens.shape[1] == final.grid_hw[0] * final.grid_hw[1]:
                    grid = final.grid_hw
                else:
                    continue
                labels.append(label)
                rows.append(sweep_metrics(tokens, views, grid))
            if labels:
                sweep.levels["resampled"] = _table(labels, rows)
        return sweep


def _grid_tokens(feats: TokenFeatures) -> tuple[Tensor, tuple[int, int]] | None:
    """``(tokens (V, gh*gw, D) without prefix, grid)`` of a grid level; None for queries."""
    if feats.layout != "grid" or feats.grid_hw is None:
        return None
    grid = tuple(int(g) for g in feats.grid_hw)
    tokens = feats.tokens.float()
    return tokens[:, tokens.shape[1] - grid[0] * grid[1]:], grid


def _table(labels: list[str], rows: list[dict[str, float]]) -> dict[str, Any]:
    names = [m for m in SWEEP_METRICS if any(m in r for r in rows)]
    return {"layers": labels, "metrics": {m: [r.get(m, float("nan")) for r in rows] for m in names}}
