"""Recognise a PanoLLaVA checkpoint from its keys and read its settings, without PanoLLaVA installed.

Three layouts exist in the wild (``shared`` facts, file and line per revision in the docs):

============  =================================  ===============================  ======================================
revision      encoder keys                       VICReg LayerNorm                 resampler keys
============  =================================  ===============================  ======================================
``head``      ``model.vision_encoder.encoder.*``  ``model.vision_encoder.norm.*``  ``model.resampler_module.resampler.*``
``dc64bc5``   ``model.vision_backbone.encoder.*`` ``model.vision_backbone.norm.*`` ``model.resampler_module.resampler.*``
``7227614``   ``model.vision_encoder.*``          ``model.vicreg_norm.*``          ``model.resampler.*``
============  =================================  ===============================  ======================================

In every revision the encoder is the HF model's vision transformer (``AutoModel(...).vision_model``),
its ``last_hidden_state`` (all tokens, CLS and registers included) goes through the LayerNorm
when the model has one (then the checkpoint holds its weights; otherwise it is an identity) and
then into the resampler. The settings come from ``hyper_parameters``: a pickled ``CORAConfig``
at ``head`` (read as plain data: ``config.models.*``, ``config.image_processing.*``), flat keys
(``vision_name``, ``resampler_type``, ``latent_dimension``) at the two ``panovlm`` revisions,
with the crop geometry in ``datamodule_hyper_parameters``; a ``--config`` (the training
``config.yaml``) fills what the checkpoint lacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Layout", "LAYOUTS", "detect_layout", "read_settings"]


@dataclass(frozen=True)
class Layout:
    """Where one revision keeps the parts of the vision stage in the state dict."""

    revision: str
    encoder: str
    norm: str
    resampler: tuple[str, ...]


LAYOUTS: dict[str, Layout] = {
    "head": Layout("head", "model.vision_encoder.encoder.", "model.vision_encoder.norm.",
                   ("model.resampler_module.resampler.", "model.resampler.resampler.")),
    "dc64bc5": Layout("dc64bc5", "model.vision_backbone.encoder.", "model.vision_backbone.norm.",
                      ("model.resampler_module.resampler.",)),
    "7227614": Layout("7227614", "model.vision_encoder.", "model.vicreg_norm.", ("model.resampler.",)),
}
# the HF vision transformer's own top-level modules, to tell ``vision_encoder.encoder.embeddings`` (head)
# from ``vision_encoder.embeddings`` (7227614, whose transformer also has an ``encoder`` submodule)
_HF_HEADS = ("embeddings.", "vision_model.", "post_layernorm.", "pre_layrnorm.", "layernorm.", "head.")


def _has(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_layout(ckpt: Mapping[str, Any]) -> Layout | None:
    """The PanoLLaVA layout of ``ckpt`` (from its keys, then its ``hyper_parameters``), or None."""
    keys = [str(k) for k in ckpt["state_dict"].keys()]
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt.get("hyper_parameters"), Mapping) else {}
    cora = isinstance(hparams.get("config"), Mapping) and isinstance(hparams["config"].get("models"), Mapping)
    if _has(keys, "model.vision_backbone."):
        return LAYOUTS["dc64bc5"]
    if cora or any(_has(keys, f"model.vision_encoder.encoder.{h}") for h in _HF_HEADS) \
            or _has(keys, "model.resampler_module.") or _has(keys, "model.vision_encoder.norm."):
        return LAYOUTS["head"]
    if _has(keys, "model.vision_encoder.") or _has(keys, "model.vicreg_norm.") or _has(keys, "model.resampler."):
        return LAYOUTS["7227614"]
    return None


def _flatten_cora(config: Mapping[str, Any]) -> dict[str, Any]:
    """``CORAConfig`` (as plain data) -> the flat names the other revisions use."""
    models = dict(config.get("models") or {})
    images = dict(config.get("image_processing") or {})
    out: dict[str, Any] = {k: v for k, v in models.items() if v is not None}
    for key, value in images.items():
        if value is not None:
            out.setdefault(key, value)
    return out


def read_settings(ckpt: Mapping[str, Any], layout: Layout, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model and view settings of a PanoLLaVA checkpoint, as flat plain data.

    Keys (when known): ``vision_name``, ``resampler_type``, ``latent_dimension``,
    ``resampler_config`` (dict), ``use_vicreg_norm`` (from the state dict: the norm's weights
    are there exactly when the model had one), ``crop_strategy``, ``image_size``,
    ``overlap_ratio``, ``fov_deg`` and the other processor keys. The checkpoint wins over
    ``config``; ``config`` may be a CORA config (``models:``/``image_processing:``) or a
    ``panovlm`` one (``models:``/``data:``/``image_processing:``), looked up at any depth.
    """
    from panoviz_callback._hparams import _find_key

    hparams = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt.get("hyper_parameters"), Mapping) else {}
    settings: dict[str, Any] = {}
    if isinstance(hparams.get("config"), Mapping):
        settings.update(_flatten_cora(hparams["config"]))
    for key, value in hparams.items():
        if key != "config" and value is not None and not isinstance(value, Mapping):
            settings.setdefault(key, value)
    data = ckpt.get("datamodule_hyper_parameters")
    if isinstance(data, Mapping):
        for key, value in data.items():
            if value is not None and not isinstance(value, Mapping):
                settings.setdefault(key, value)
    if config:
        if isinstance(config.get("models"), Mapping) and isinstance(config.get("image_processing"), Mapping):
            for key, value in _flatten_cora(config).items():
                settings.setdefault(key, value)
        for key in ("vision_name", "resampler_type", "latent_dimension", "resampler_config", "crop_strategy",
                    "image_size", "overlap_ratio", "fov_deg"):
            value = _find_key(config, (key,))
            if value is not None:
                settings.setdefault(key, value)
    keys = ckpt["state_dict"].keys()
    settings["use_vicreg_norm"] = any(str(k).startswith(layout.norm) for k in keys)
    if not isinstance(settings.get("resampler_config"), Mapping):
        settings["resampler_config"] = {}
    settings["revision"] = layout.revision
    return settings
