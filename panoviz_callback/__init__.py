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

The public API is listed in ``__all__`` and imported explicitly for type checkers and
IDEs (the ``TYPE_CHECKING`` block below; the package ships ``py.typed``). At run time each
name is imported on first access (PEP 562), so that ``import panoviz_callback`` and
``panoviz --help`` import no torch, and the checkpoint runner never imports Lightning
(only :class:`PanoVizCallback` needs it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from panoviz_callback.analysis import AnalysisResult, Analyzer, analyze
    from panoviz_callback.callback import PanoVizCallback
    from panoviz_callback.correspondence import patch_correspondence
    from panoviz_callback.features import extract_features
    from panoviz_callback.panorama import PanoramaError, load_panorama, synthetic_panorama
    from panoviz_callback.pca import PCAState, pca_rgb
    from panoviz_callback.projection import erp_to_perspective
    from panoviz_callback.timeline import plot_timeline
    from panoviz_callback.views import Camera, ViewSet, make_views
    from panoviz_callback.vision_stage import load_vision_stage

__version__ = "0.1.0"

#: Where each public name lives (the run-time counterpart of the imports above).
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
    "plot_timeline": "panoviz_callback.timeline",
    # offline
    "load_vision_stage": "panoviz_callback.vision_stage",
    # live
    "PanoVizCallback": "panoviz_callback.callback",
}

__all__ = [
    "__version__",
    "PanoramaError",
    "load_panorama",
    "synthetic_panorama",
    "erp_to_perspective",
    "Camera",
    "ViewSet",
    "make_views",
    "patch_correspondence",
    "extract_features",
    "PCAState",
    "pca_rgb",
    "analyze",
    "Analyzer",
    "AnalysisResult",
    "plot_timeline",
    "load_vision_stage",
    "PanoVizCallback",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'panoviz_callback' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
