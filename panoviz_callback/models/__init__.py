"""A reference vision stage to try, test and train the plugin end to end.

- :class:`PanoVisionModule`: vision encoder + resampler + projector trained with VICReg
  on the overlapping tokens of adjacent views.
- :class:`PanoDataModule`: panoramas from a folder or synthetic ones, turned by random
  yaws and cut into views.
- :class:`VICRegOverlapLoss` and :func:`strip_correspondence`: the loss and the original
  column-strip pairing it can be compared with.
- :func:`build_resampler`: ``"identity"``, ``"mlp"``, ``"qformer"``, ``"perceiver"``.
"""

from panoviz_callback.models.data import PanoDataModule
from panoviz_callback.models.module import PanoVisionModule
from panoviz_callback.models.resamplers import RESAMPLER_KINDS, build_resampler
from panoviz_callback.models.vicreg import VICRegOverlapLoss, strip_correspondence

__all__ = [
    "PanoVisionModule",
    "PanoDataModule",
    "VICRegOverlapLoss",
    "strip_correspondence",
    "build_resampler",
    "RESAMPLER_KINDS",
]
