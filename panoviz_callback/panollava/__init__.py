"""PanoLLaVA (github.com/wooseungw/panollava) checkpoints: layouts, settings, resamplers, view conventions.

Everything specific to PanoLLaVA lives here, so that :mod:`panoviz_callback.checkpoint` stays a
generic reader and the next VLM family is one more adapter beside this one.

Modules:
    layouts: the three checkpoint layouts (keys, settings read as plain data).
    stage: the encoder + VICReg LayerNorm + resampler rebuilt from a checkpoint.
    live: the same parts found inside a PanoLLaVA training module (the callback's ``"auto"``).
    resamplers: every resampler type PanoLLaVA defines, with its key layout.
    views: :func:`~panoviz_callback.panollava.views.panollava_view_settings`, PanoLLaVA's processor
        settings -> ``make_views`` arguments.
"""

from panoviz_callback.panollava.layouts import (
    LAYOUTS,
    Layout,
    detect_layout,
    read_settings,
)
from panoviz_callback.panollava.stage import PanoLLaVAResampler, build, describe

__all__ = ["LAYOUTS", "Layout", "PanoLLaVAResampler", "build", "describe", "detect_layout", "read_settings"]
