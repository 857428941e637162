"""What one analysis returns: per-metric values, per-level results, and the whole result (scalars, JSON)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from panoviz_callback.features import TokenFeatures
from panoviz_callback.inside import InsideResult
from panoviz_callback.pca import PCAState
from panoviz_callback.views import ViewSet

__all__ = ["MetricResult", "LevelResult", "AnalysisResult"]


@dataclass
class MetricResult:
    """One metric of one level: per-pair values and their summary, or the reason it was skipped.

    Attributes:
        per_pair: one value per pair of :attr:`ViewSet.pairs` (NaN where undefined, e.g.
            a pair without overlap while other pairs overlap).
        mean: mean over the defined pairs.
        std: population standard deviation over the defined pairs.
        skipped: why the metric was not computed (then the other fields are None).
        chance: for the matching accuracies, the mean over the defined pairs of the score of
            features that carry no information (``metrics.matching_chance``), else None.
        ceiling: for ``hungarian_accuracy``, the mean best score any one-to-one matching can
            reach from the geometry alone (``metrics.matching_ceiling``), else None.
    """

    per_pair: list[float] | None = None
    mean: float | None = None
    std: float | None = None
    skipped: str | None = None
    chance: float | None = None
    ceiling: float | None = None

    @classmethod
    def from_values(cls, values: Sequence[float], reason_if_empty: str) -> MetricResult:
        """Summarise ``values``; skipped with ``reason_if_empty`` when none is finite."""
        values = [float(v) for v in values]
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(skipped=reason_if_empty)
        mean = sum(finite) / len(finite)
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))
        return cls(per_pair=values, mean=mean, std=std)

    def to_dict(self) -> dict[str, Any]:
        """``{"per_pair", "mean", "std"}`` (NaN as None, plus ``chance``/``ceiling`` when set) or
        ``{"skipped": reason}``."""
        if self.skipped is not None:
            return {"skipped": self.skipped}
        per_pair = [v if math.isfinite(v) else None for v in self.per_pair or []]
        out = {"per_pair": per_pair, "mean": self.mean, "std": self.std}
        out.update({k: v for k, v in (("chance", self.chance), ("ceiling", self.ceiling)) if v is not None})
        return out


@dataclass
class LevelResult:
    """The analysis of one level (``"vision_encoder"`` or ``"resampled"``).

    Attributes:
        name: the level name.
        features: the token features (float32) and their layout.
        pca_images: ``(V, 3, gh, gw)`` in ``[0, 1]``, or ``(V, 3, 1, Q)`` strips for query tokens.
        fg_mask: ``(V, N)`` bool, the tokens the PCA treated as foreground.
        metrics: ``{metric name: MetricResult}`` in :data:`METRICS` order.
        valid: ``(V, N)`` bool, the tokens that see image content (False: letterbox padding of a
            global view, drawn grey and left out of the PCA), or None when all do.
        bg_note: why the PCA kept every token although a background mode was asked for
            (e.g. "not bimodal"), else None.
    """

    name: str
    features: TokenFeatures
    pca_images: Tensor
    fg_mask: Tensor
    metrics: dict[str, MetricResult] = field(default_factory=dict)
    valid: Tensor | None = None
    bg_note: str | None = None

    @property
    def masked_share(self) -> list[float]:
        """Per view, the share of its image tokens the PCA left out (background or outliers), in [0, 1]."""
        valid = torch.ones_like(self.fg_mask) if self.valid is None else self.valid.to(self.fg_mask.device)
        masked = (~self.fg_mask & valid).sum(1).double()
        return (masked / valid.sum(1).clamp_min(1).double()).tolist()

    @property
    def spatial(self) -> bool:
        """True when the tokens lie on a grid of the view (False for query tokens)."""
        return self.features.layout == "grid" and self.features.grid_hw is not None


@dataclass
class AnalysisResult:
    """Everything one analysis produced.

    Attributes:
        views: the views that were analysed (on the analysis device).
        levels: ``{"vision_encoder": LevelResult, "resampled": LevelResult}`` (the latter
            only with a resampler).
        pca_states: the PCA state per level (pass back for stable colours).
        timings: seconds per stage (``"encoder"``, ``"resampler"``, ``"LEVEL/pca"``,
            ``"LEVEL/METRIC"``, ``"LEVEL/correspondence"``, ``"LEVEL/warp"``, ``"total"``).
    """

    views: ViewSet
    levels: dict[str, LevelResult]
    pca_states: dict[str, PCAState]
    timings: dict[str, float] = field(default_factory=dict)
    inside: InsideResult | None = None

    def scalars(self) -> dict[str, float]:
        """``{"LEVEL/METRIC": mean}`` for every metric that was computed (skipped ones left out),
        ``{"LEVEL/masked_share": mean over views}``, the share of tokens the PCA left out, plus the
        :class:`~panoviz_callback.inside.InsideResult` scalars when ``inside`` was on."""
        out = {
            f"{level}/{name}": float(m.mean)
            for level, res in self.levels.items()
            for name, m in res.metrics.items()
            if m.skipped is None and m.mean is not None
        }
        for level, res in self.levels.items():
            share = res.masked_share
            out[f"{level}/masked_share"] = float(sum(share) / len(share)) if share else 0.0
        if self.inside is not None:
            out.update(self.inside.scalars())
        return out

    def to_dict(self, image: Any = None, checkpoint: Any = None) -> dict[str, Any]:
        """The ``similarity_NAME.json`` dict (schema in :mod:`panoviz_callback.report`); JSON-serialisable.

        Args:
            image: the probe image path to record (``None``: in-memory probe).
            checkpoint: the checkpoint path to record.
        """
        views = [
            {"yaw_deg": float(c.yaw_deg), "pitch_deg": float(c.pitch_deg), "fov_deg": float(c.fov_deg), "kind": c.kind}
            for c in self.views.cameras
        ]
        levels = {
            name: {
                "token_grid": [int(v) for v in res.features.grid_hw] if res.spatial else None,
                "masked_share": [round(v, 6) for v in res.masked_share],
                "bg_note": res.bg_note,
                "metrics": {metric: m.to_dict() for metric, m in res.metrics.items()},
            }
            for name, res in self.levels.items()
        }
        out = {
            "image": None if image is None else str(image),
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "crop_strategy": self.views.strategy,
            "views": views,
            "pairs": [[int(i), int(j)] for i, j in self.views.pairs],
            "levels": levels,
        }
        if self.inside is not None:
            out["inside"] = self.inside.to_dict()
        return out
