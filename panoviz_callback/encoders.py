"""Build a vision encoder offline: ``"tiny"``, a transformers config, a local folder or a cached hub name."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

_FULL_MODEL_TYPES = ("clip", "siglip", "siglip2")
_TINY = {
    "model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 2, "patch_size": 16, "image_size": 224, "vision_use_head": False,
}
_LOADER_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "device_map", "revision", "cache_dir")

__all__ = ["load_vision_encoder"]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_vision_encoder(spec: Any, *, pretrained: bool = True, **overrides: Any) -> nn.Module:
    """Build a vision encoder offline, in eval mode.

    Args:
        spec: one of

            - ``"tiny"``: a small randomly initialised SigLIP vision model (hidden 64, 2 layers,
              2 heads, patch 16, 224 px, no pooling head); deterministic under ``torch.manual_seed``;
            - a transformers config object, or a dict with ``"model_type"``;
            - a local folder written by ``save_pretrained``;
            - a hub name (``"google/siglip-base-patch16-224"``), loaded only from the local cache.

            For a full CLIP / SigLIP / SigLIP2 model only the vision tower is built, and only
            its weights are loaded (the text weights in the folder are skipped quietly).
        pretrained: load the weights of a folder or hub name; ``False`` builds the architecture
            from its config with random weights (e.g. to load a training checkpoint into it).
        **overrides: vision config attributes (``image_size=128``) and ``from_pretrained`` /
            ``from_config`` options (``dtype``, ``attn_implementation``, ...).

    Returns:
        the vision model (``SiglipVisionModel``, ``CLIPVisionModel``, ``Dinov2Model``, ...).

    Raises:
        ValueError: an uncached hub name, a missing folder, an unknown option.
        TypeError: an unsupported ``spec`` type.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> load_vision_encoder("tiny", image_size=64).config.image_size
        64
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(spec, str) and spec == "tiny":
        return _from_config(AutoConfig.for_model(**_TINY), overrides)
    if isinstance(spec, PretrainedConfig):
        return _from_config(spec, overrides)
    if isinstance(spec, Mapping):
        if "model_type" not in spec:
            raise ValueError(f"Expected a config dict with a 'model_type' key, got keys {sorted(spec)}.")
        return _from_config(AutoConfig.for_model(**dict(spec)), overrides)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"Expected `spec` to be 'tiny', a config, a dict, a folder or a hub name, got {type(spec).__name__}."
        )
    path = os.path.expanduser(os.fspath(spec))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"Folder '{path}' holds no config.json; expected a folder written by save_pretrained.")
        return _from_pretrained(path, pretrained, overrides)
    if os.path.exists(path) or path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:
        raise ValueError(f"'{path}' is not a folder; expected a folder written by save_pretrained (with config.json).")
    try:
        return _from_pretrained(path, pretrained, overrides)
    except OSError as err:
        raise ValueError(
            f"'{path}' is not in the local Hugging Face cache and this machine cannot download it; pass a local "
            f"folder saved with save_pretrained (e.g. run `AutoModel.from_pretrained('{path}').save_pretrained(DIR)` "
            f"where the network is available and pass DIR), or fill the cache with `hf download {path}`."
        ) from err


def _split_overrides(config: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set the config attributes in ``overrides`` on ``config``; return the loader options."""
    loader = {}
    for key, value in overrides.items():
        if key in _LOADER_KWARGS:
            loader[key] = value
        elif hasattr(config, key):
            setattr(config, key, value)
        else:
            raise ValueError(
                f"Unknown option `{key}` for {type(config).__name__}; expected a config attribute or one of "
                f"{_LOADER_KWARGS}."
            )
    return loader


def _vision_config(config: Any) -> Any:
    return config.vision_config if config.model_type in _FULL_MODEL_TYPES else config


def _from_config(config: Any, overrides: Mapping[str, Any]) -> nn.Module:
    from transformers import AutoModel

    config = _vision_config(copy.deepcopy(config))
    loader = _split_overrides(config, overrides)
    return AutoModel.from_config(config, **loader).eval()


def _from_pretrained(path: str, pretrained: bool, overrides: Mapping[str, Any]) -> nn.Module:
    from transformers import MODEL_MAPPING, AutoConfig

    full = AutoConfig.from_pretrained(path, local_files_only=True)
    if not pretrained:
        return _from_config(full, overrides)
    config = _vision_config(full)
    loader = _split_overrides(config, overrides)
    try:
        cls = MODEL_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no model class for {type(config).__name__} (from '{path}').") from None
    quiet = _quiet_transformers() if config is not full else contextlib.nullcontext()
    with quiet:
        model, info = cls.from_pretrained(
            path, config=config, local_files_only=True, output_loading_info=True, **loader
        )
    missing = list(info.get("missing_keys", []))
    if missing:
        warnings.warn(
            f"{cls.__name__} from '{path}': {len(missing)} weights missing and randomly initialised, "
            f"e.g. {missing[:3]}.", stacklevel=3,
        )
    return model.eval()
