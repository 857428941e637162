"""PanoLLaVA (github.com/wooseungw/panollava) checkpoints: layouts, settings, resamplers, view conventions.

Everything specific to PanoLLaVA lives here, so that :mod:`panoviz_callback.checkpoint` stays a
generic reader and the next VLM family is one more adapter beside this one.
"""

from panoviz_callback.panollava.layouts import (
    ENCODER_PREFIXES,
    RESAMPLER_PREFIXES,
    build,
    describe,
    detect_layout,
)

__all__ = ["ENCODER_PREFIXES", "RESAMPLER_PREFIXES", "build", "describe", "detect_layout"]
