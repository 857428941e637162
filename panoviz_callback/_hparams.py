"""Look settings up in hyper-parameters and configs (nested mappings, LightningCLI sections)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_GEOMETRY_KEYS = {"fov_deg": ("fov_deg", "fov"), "overlap": ("overlap", "overlap_ratio"), "pitches": ("pitches",)}

def _find_prefix(keys: list[str], prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if any(k.startswith(p) for k in keys)), None)


def _find_key(tree: Any, names: tuple[str, ...]) -> Any:
    """The value of the first of ``names`` found breadth-first in nested mappings (None if absent)."""
    level = [tree]
    while level:
        for node in level:
            if isinstance(node, Mapping):
                for name in names:
                    if node.get(name) is not None:
                        return node[name]
        level = [v for node in level if isinstance(node, Mapping) for v in node.values() if isinstance(v, Mapping)]
    return None


def _plain_dict(value: Any) -> dict[str, Any]:
    return {str(k): v for k, v in value.items()} if isinstance(value, Mapping) else {}


def _config_model(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The LightningCLI ``model:`` section (``class_path`` / ``init_args``) or the config itself."""
    section = config.get("model")
    return section if isinstance(section, Mapping) and "class_path" in section else config


def _config_class(config: Mapping[str, Any]) -> Any:
    section = _config_model(config)
    return section.get("class_path") if section is not config else config.get("class_path", config.get("module"))


def _config_hparams(config: Mapping[str, Any]) -> dict[str, Any]:
    out = _plain_dict(_config_model(config).get("init_args"))
    for name in ("vision_name", "resampler_type", "latent_dimension", "resampler_depth", "vision_overrides"):
        value = _find_key(config, (name,))
        if value is not None:
            out[name] = value
    return out


def _merge(first: Mapping[str, Any], fallback: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(first)
    for key, value in fallback.items():
        if merged.get(key) is None:
            merged[key] = value
    return merged


def _geometry(*sources: Any) -> dict[str, Any]:
    """``crop_strategy``, ``image_size`` and ``crop_options`` from the first source that has each."""
    out: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for src in sources:
        if not isinstance(src, Mapping):
            continue
        for name in ("crop_strategy", "image_size"):
            value = _find_key(src, (name,))
            if name not in out and value is not None:
                out[name] = value
        nested = _find_key(src, ("crop_options",))
        for key, value in (_plain_dict(nested)).items():
            options.setdefault(key, value)
        for key, names in _GEOMETRY_KEYS.items():
            value = _find_key(src, names)
            if value is not None:
                options.setdefault(key, value)
    if isinstance(out.get("image_size"), list | tuple):
        out["image_size"] = out["image_size"][0]
    if options:
        out["crop_options"] = options
    return out
