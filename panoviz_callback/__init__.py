"""panoviz_callback: see what a panoramic VLM's vision encoder and resampler learned.

A fixed probe panorama is cut into perspective views, the views go through the
vision encoder (and resampler), token features are mapped to RGB with PCA and
adjacent views are compared. The same analysis runs live in a Lightning
callback (:class:`PanoVizCallback`) and offline on checkpoints (``panoviz``).

Shape vocabulary (used in every docstring and ``# (V, N, D)`` comment):

- ``B``: panoramas in a batch
- ``V``: views cut from one panorama
- ``C``: channels (3 for RGB)
- ``H x W``: panorama size (equirectangular, ``W = 2 H``)
- ``h x w`` (or ``S x S``): view size
- ``N``: tokens per view, ``gh x gw``: the token grid
- ``D``: feature dimension
- ``Q``: resampler queries
- ``K``: PCA components
- ``P``: view pairs

Public names are imported lazily so that ``panoviz --help`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # foundation
    "PanoramaError": "panoviz_callback.panorama",
    "load_panorama": "panoviz_callback.panorama",
    "synthetic_panorama": "panoviz_callback.panorama",
    "erp_to_perspective": "panoviz_callback.projection",
    "Camera": "panoviz_callback.views",
    "ViewSet": "panoviz_callback.views",
    "make_views": "panoviz_callback.views",
    "patch_correspondence": "panoviz_callback.correspondence",
    # analysis core
    "extract_features": "panoviz_callback.features",
    "PCAState": "panoviz_callback.pca",
    "pca_rgb": "panoviz_callback.pca",
    "analyze": "panoviz_callback.analysis",
    "Analyzer": "panoviz_callback.analysis",
    "AnalysisResult": "panoviz_callback.analysis",
    # offline
    "load_vision_stage": "panoviz_callback.vision_stage",
    # live
    "PanoVizCallback": "panoviz_callback.callback",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'panoviz_callback' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
