"""Find PanoLLaVA's vision stage inside its training module, for the callback's ``"auto"`` search.

PanoLLaVA wraps the HF encoder (``VisionBackbone``, whose forward returns a dict) and the
resampler (``ResamplerModule``); the callback needs the HF model itself and a resampler that
computes what the model computes: ``resampler(norm(all tokens))``. The parts are found by
structure, never by importing PanoLLaVA:

- head: ``model.vision_encoder.encoder`` (HF), ``model.vision_encoder.norm``,
  ``model.resampler_module.resampler``;
- dc64bc5: ``model.vision_backbone.encoder``, ``model.vision_backbone.norm``,
  ``model.resampler_module.resampler``;
- 7227614: ``model.vision_encoder`` (HF), ``model.vicreg_norm``, ``model.resampler``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from panoviz_callback.lookup import _get_path

__all__ = ["LiveStage", "find_live_stage"]

_CANDIDATES = (  # revision, encoder, norm, resampler (attribute paths)
    ("head", "model.vision_encoder.encoder", "model.vision_encoder.norm", "model.resampler_module.resampler"),
    ("dc64bc5", "model.vision_backbone.encoder", "model.vision_backbone.norm", "model.resampler_module.resampler"),
    ("7227614", "model.vision_encoder", "model.vicreg_norm", "model.resampler"),
)


class LiveStage:
    """The parts of a PanoLLaVA module: ``encoder`` (HF model), ``resampler`` (norm + resampler), their paths."""

    def __init__(self, revision: str, encoder: nn.Module, resampler: nn.Module | None, paths: dict[str, str | None]):
        self.revision, self.encoder, self.resampler, self.paths = revision, encoder, resampler, paths


def _is_hf_vision(module: Any) -> bool:
    config = getattr(module, "config", None)
    return isinstance(module, nn.Module) and getattr(config, "model_type", None) is not None \
        and getattr(config, "hidden_size", None) is not None


def find_live_stage(root: nn.Module) -> LiveStage | None:
    """PanoLLaVA's vision stage inside ``root`` (a LightningModule), or None when ``root`` is not PanoLLaVA's."""
    from panoviz_callback.panollava.stage import PanoLLaVAResampler, _num_prefix_tokens

    for revision, enc_path, norm_path, res_path in _CANDIDATES:
        encoder, norm = _get_path(root, enc_path), _get_path(root, norm_path)
        if not _is_hf_vision(encoder) or not isinstance(norm, nn.LayerNorm | nn.Identity):
            continue
        inner = _get_path(root, res_path)
        if not isinstance(inner, nn.Module):
            return LiveStage(revision, encoder, None, {"encoder": enc_path, "resampler": None})
        resampler = PanoLLaVAResampler(inner, norm, _num_prefix_tokens(encoder))
        return LiveStage(revision, encoder, resampler, {"encoder": enc_path, "resampler": res_path})
    return None
