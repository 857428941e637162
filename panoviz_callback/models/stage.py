"""The vision stage of :class:`~panoviz_callback.models.PanoVisionModule`, without Lightning.

The checkpoint runner needs only the encoder and the resampler of a checkpoint written by
``PanoVisionModule``; :class:`PanoVisionStage` builds them from the checkpoint's
``hyper_parameters`` with the same code as the LightningModule, but importing this module
imports neither Lightning nor the training code, so ``panoviz`` starts fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from panoviz_callback._checks import _check_choice
from panoviz_callback.models.resamplers import RESAMPLER_KINDS, build_resampler

__all__ = ["PanoVisionStage", "STAGE_DEFAULTS"]

#: The constructor defaults of ``PanoVisionModule`` that decide the vision stage.
STAGE_DEFAULTS: dict[str, Any] = {
    "vision_name": "tiny", "vision_overrides": None, "resampler_type": "mlp", "latent_dimension": None,
    "num_queries": 16, "resampler_depth": None, "resampler_heads": None,
}


class PanoVisionStage(nn.Module):
    """The encoder and resampler of ``PanoVisionModule`` as a plain module (same attribute names and
    state-dict prefixes), with its builder: what the runner rebuilds from such a checkpoint.

    Args:
        **hparams: ``PanoVisionModule``'s constructor arguments (a checkpoint's
            ``hyper_parameters``); only those of :data:`STAGE_DEFAULTS` are used.
    """

    encoder_attr = "vision_encoder"
    resampler_attr = "resampler"
    state_prefixes = {"vision_encoder": "vision_encoder.", "resampler": "resampler.", "projector": "projector."}

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.vision_encoder, self.resampler = self.build_vision_stage(hparams)

    @staticmethod
    def build_vision_stage(hparams: Mapping[str, Any], *, pretrained: bool = True) -> tuple[nn.Module, nn.Module]:
        """Build the encoder (``eval`` mode) and the resampler from ``hyper_parameters``.

        Missing keys take :data:`STAGE_DEFAULTS`; unknown keys are ignored.
        See :meth:`PanoVisionModule.build_vision_stage`.
        """
        from panoviz_callback.features import load_vision_encoder

        h = {**STAGE_DEFAULTS, **{k: v for k, v in dict(hparams).items() if k in STAGE_DEFAULTS}}
        _check_choice(h["resampler_type"], RESAMPLER_KINDS, "resampler_type")
        encoder = load_vision_encoder(h["vision_name"], pretrained=pretrained, **(h["vision_overrides"] or {}))
        in_dim = encoder_hidden_size(encoder)
        resampler = build_resampler(
            h["resampler_type"], in_dim, h["latent_dimension"] or in_dim, num_queries=h["num_queries"],
            depth=h["resampler_depth"], heads=h["resampler_heads"],
        )
        return encoder, resampler


def vision_config(encoder: nn.Module) -> Any:
    """The vision config of a transformers encoder (``config.vision_config`` or ``config``)."""
    cfg = getattr(encoder, "config", None)
    return getattr(cfg, "vision_config", None) or cfg


def encoder_hidden_size(encoder: nn.Module) -> int:
    """``config.hidden_size`` of a transformers vision encoder.

    Raises:
        ValueError: the encoder has no such config.
    """
    size = getattr(vision_config(encoder), "hidden_size", None)
    if size is None:
        raise ValueError(
            f"Cannot read the hidden size of {type(encoder).__name__} (`config.hidden_size`); PanoVisionModule "
            "needs a transformers vision model (a preset, a local folder or a cached hub name)."
        )
    return int(size)
