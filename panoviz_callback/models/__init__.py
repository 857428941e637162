"""A reference vision stage to try, test and train the plugin end to end.

- :class:`PanoVisionModule`: vision encoder + resampler + projector trained with VICReg
  on the overlapping tokens of adjacent views.
- :class:`PanoDataModule`: panoramas from a folder or synthetic ones, turned by random
  yaws and cut into views.
- :class:`VICRegOverlapLoss` and :func:`strip_correspondence`: the loss and the original
  column-strip pairing it can be compared with.
- :func:`build_resampler`: ``"identity"``, ``"mlp"``, ``"qformer"``, ``"perceiver"``.
- :class:`PanoVisionStage`: the encoder + resampler builder of ``PanoVisionModule``
  without Lightning (what the checkpoint runner uses).

The two Lightning classes are imported on first access, so that ``panoviz`` (which only
rebuilds the vision stage) never imports Lightning; type checkers and IDEs see them
through the ``TYPE_CHECKING`` imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from panoviz_callback.models.resamplers import RESAMPLER_KINDS, build_resampler
from panoviz_callback.models.stage import PanoVisionStage
from panoviz_callback.models.vicreg import VICRegOverlapLoss, strip_correspondence

if TYPE_CHECKING:
    from panoviz_callback.models.data import PanoDataModule
    from panoviz_callback.models.module import PanoVisionModule

__all__ = [
    "PanoVisionModule",
    "PanoDataModule",
    "PanoVisionStage",
    "VICRegOverlapLoss",
    "strip_correspondence",
    "build_resampler",
    "RESAMPLER_KINDS",
]

_LIGHTNING = {"PanoVisionModule": "panoviz_callback.models.module", "PanoDataModule": "panoviz_callback.models.data"}


def __getattr__(name: str) -> Any:
    module = _LIGHTNING.get(name)
    if module is None:
        raise AttributeError(f"module 'panoviz_callback.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
