"""Rebuild only the vision encoder and the resampler of a training checkpoint (a language model never).

What to build is worked out from the checkpoint alone (plus, at most, a ``--config`` YAML
and a ``--module`` the user names); kinds of :class:`ModelSpec`:

- ``"panoviz"``: a :class:`~panoviz_callback.models.PanoVisionModule` checkpoint
  (``hyper_parameters`` with ``vision_name``/``resampler_type``, weights under
  ``vision_encoder.*``/``resampler.*``), or a checkpoint written with
  :class:`~panoviz_callback.PanoVizCallback` whose LightningModule class lies inside this
  package or was named with ``--module`` and has ``build_vision_stage``.
- ``"described"``: a checkpoint written with the callback on any other LightningModule: the
  callback recorded the encoder's transformers config and the resampler's type and settings
  (``vision_stage`` in its state), so transformers and this package build the parts and the
  user's code is never imported.
- ``"module"``: a LightningModule class named with ``--module`` (or recorded in the file and
  confirmed with ``--trust_checkpoint``), built from the checkpoint's ``hyper_parameters``.
- ``"panollava"``: PanoLLaVA's own checkpoints (see :mod:`panoviz_callback.panollava`).

A module path recorded in a checkpoint or a config is imported only when it lies inside
``panoviz_callback``, the user named it with ``--module``, or passed ``--trust_checkpoint``;
the current folder is never put on ``sys.path``.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from panoviz_callback._hparams import (
    _config_class,
    _config_hparams,
    _find_prefix,
    _geometry,
    _merge,
    _plain_dict,
)
from panoviz_callback.checkpoint import (
    Log,
    ModelSpecError,
    _first_line,
    _warn,
    check_limit,
    load_config,
    read_checkpoint,
)
from panoviz_callback.described import (  # noqa: E402
    build_described,
    check_model_config,
    describe_parts,
)
from panoviz_callback.weights import LoadReport, _load_part, finish_load  # noqa: E402

__all__ = [
    "ModelSpec", "LoadReport", "CheckpointModel", "describe_model", "build_model", "load_model",
    "load_vision_stage", "describe_parts",
]


_PANOVIZ_PREFIXES = ("vision_encoder.", "resampler.")
_CALLBACK_KEY = "PanoVizCallback"
_NO_DESCRIPTION = ("this checkpoint holds no model configuration; pass --config path/to/config.yaml or "
                   "--module pkg.mod:Class")


@dataclass
class ModelSpec:
    """What to build (cheap to make: no network, no weights).

    Attributes:
        kind: ``"panoviz"``, ``"described"``, ``"module"`` or ``"panollava"``.
        source: a short description for messages.
        hparams: the merged hyper-parameters (checkpoint first, config fills the gaps).
        cls: the LightningModule class (``"panoviz"`` / ``"module"``).
        prefixes: ``{"encoder": ..., "resampler": ...}`` state-dict prefixes (None: no resampler)
            for the kinds that slice the state dict; attribute paths for ``"module"``.
        geometry: ``crop_strategy`` / ``image_size`` / ``crop_options`` found in the checkpoint or config.
        callback: the :class:`~panoviz_callback.PanoVizCallback` state, if the checkpoint has one.
        global_step: the checkpoint's global step (None if absent).
    """

    kind: str
    source: str
    hparams: dict[str, Any]
    cls: type | None = None
    prefixes: dict[str, str | None] = field(default_factory=dict)
    geometry: dict[str, Any] = field(default_factory=dict)
    callback: dict[str, Any] | None = None
    global_step: int | None = None


@dataclass
class CheckpointModel:
    """The rebuilt encoder and resampler (eval mode, no gradients) and what the checkpoint says."""

    encoder: nn.Module
    resampler: nn.Module | None
    spec: ModelSpec
    report: LoadReport

    @property
    def views(self) -> dict[str, Any]:
        """The views the model was trained (or probed) with: ``{"strategy", "image_size", "options"}``.

        The callback's settings when the checkpoint has them, else the checkpoint's or config's
        crop geometry (PanoLLaVA's processor conventions for a PanoLLaVA checkpoint), else e2p at 224 px;
        usable as ``make_views(pano, v["strategy"], v["image_size"], **v["options"])``.
        """
        saved = dict((self.spec.callback or {}).get("settings") or {})
        source = saved if saved.get("crop_strategy") else self.spec.geometry
        return {"strategy": source.get("crop_strategy") or "e2p", "image_size": int(source.get("image_size") or 224),
                "options": dict(source.get("crop_options") or {})}



# ------------------------------------------------------------------------------------------- describing
def describe_model(
    ckpt: Mapping[str, Any], *, config: Mapping[str, Any] | None = None, module: str | None = None,
    encoder: str | None = None, resampler: str | None = None, config_name: str = "--config", trust: bool = False,
) -> ModelSpec:
    """Work out what to build from the checkpoint, ``config`` and ``module`` (no weights are touched).

    Args:
        ckpt: from :func:`~panoviz_callback.checkpoint.read_checkpoint`.
        config: from :func:`~panoviz_callback.checkpoint.load_config` (fills what the checkpoint lacks).
        module: ``"pkg.mod:Class"``, the LightningModule class to rebuild, named by the user.
        encoder: attribute path of the encoder in that class (``"model.vision_encoder"``).
        resampler: attribute path of the resampler (``"none"``: no resampler level).
        config_name: how to name the config in messages.
        trust: allow importing a class recorded in the checkpoint or config.

    Raises:
        ModelSpecError: the model cannot be rebuilt; the message says what is missing and how to give it.
    """
    config = dict(config or {})
    state = _callback_state(ckpt)
    keys = list(ckpt["state_dict"].keys())
    hparams = _merge(_plain_dict(ckpt.get("hyper_parameters")), _config_hparams(config))
    geometry = _geometry(ckpt.get("hyper_parameters"), ckpt.get("datamodule_hyper_parameters"), config)
    step = ckpt.get("global_step")
    common = {"geometry": geometry, "callback": state, "global_step": int(step) if isinstance(step, int) else None}

    from panoviz_callback import panollava

    described = (state or {}).get("vision_stage")
    by_callback = isinstance(described, Mapping) and described.get("family") == "panollava"
    layout = None if module or (state and state.get("module_class") and not by_callback) \
        else panollava.detect_layout(ckpt)
    if layout is not None:
        return panollava.describe(ckpt, layout, config=config, config_name=config_name, common=common)

    cls = None
    class_path = module or _config_class(config)
    origin = "--module" if module else config_name
    if class_path is None and state is not None and state.get("module_class"):
        class_path, origin = state["module_class"], "the checkpoint's PanoVizCallback state"
        described = state.get("vision_stage")
        if not trust and not _inside_package(class_path) and isinstance(described, Mapping) \
                and described.get("encoder"):
            return _described_spec(state, class_path, common)
    if class_path is not None:
        if not isinstance(class_path, str):
            raise ModelSpecError(f"{config_name}: `class_path` must be a string 'pkg.mod:Class', got {class_path!r}")
        cls = _import_class(class_path if module else _LIGHTNING_FREE.get(class_path, class_path), origin,
                            allowed=bool(module) or trust)
        if not module and not trust and not hasattr(cls, "build_vision_stage") \
                and not any(c.__name__ == "LightningModule" for c in cls.__mro__):
            raise ModelSpecError(f"{origin} names `{class_path}`, which is not a LightningModule or vision-stage "
                                 f"builder; rerun with --module {class_path} if you mean it")
        _check_stage_sizes(hparams, origin if module else "the checkpoint's hyper_parameters")

    if cls is not None:
        enc_path = encoder or (state or {}).get("encoder_path")
        res_path = resampler if resampler is not None else (state or {}).get("resampler_path")
        if state is not None and resampler is None and state.get("resampler_path") is None:
            res_path = "none"
        if hasattr(cls, "build_vision_stage") and not (module and (encoder or resampler)):
            declared = getattr(cls, "state_prefixes", {}) or {}
            prefixes = {
                "encoder": f"{enc_path}." if enc_path else declared.get("vision_encoder", _PANOVIZ_PREFIXES[0]),
                "resampler": None if res_path == "none" else (
                    f"{res_path}." if res_path else declared.get("resampler", _PANOVIZ_PREFIXES[1])),
            }
            return ModelSpec("panoviz", f"{cls.__qualname__} ({class_path})", hparams, cls, prefixes, **common)
        return ModelSpec("module", f"{cls.__qualname__} ({class_path})", hparams, cls,
                         {"encoder": enc_path, "resampler": res_path}, **common)

    if _find_prefix(keys, _PANOVIZ_PREFIXES[:1]) is not None and ("vision_name" in hparams or config):
        _require(hparams, ("vision_name",), bool(config), config_name, "this checkpoint")
        _check_stage_sizes(hparams, "the checkpoint's hyper_parameters")
        from panoviz_callback.models.stage import PanoVisionStage

        prefixes = {"encoder": _PANOVIZ_PREFIXES[0],
                    "resampler": _PANOVIZ_PREFIXES[1] if _find_prefix(keys, _PANOVIZ_PREFIXES[1:]) else None}
        return ModelSpec("panoviz", "PanoVisionModule layout (vision_encoder.*)", hparams, PanoVisionStage,
                         prefixes, **common)
    if config:
        raise ModelSpecError(f"the model cannot be rebuilt: {config_name} names no `vision_name` or `class_path` "
                             "and the checkpoint's weights are in no known layout (model.vision_encoder.*, "
                             "vision_encoder.*); pass --module pkg.mod:Class")
    raise ModelSpecError(_NO_DESCRIPTION)


_STAGE_SIZES = (("latent_dimension", "hidden size"), ("num_queries", "num_queries"),
                ("resampler_depth", "number of layers"), ("resampler_heads", "attention heads"),
                ("projector_dim", "hidden size"), ("image_size", "image_size"))


def _check_stage_sizes(hparams: Mapping[str, Any], source: str) -> None:
    """Sizes a vision-stage builder takes from ``hparams`` are capped before anything is built."""
    for key, limit in _STAGE_SIZES:
        if hparams.get(key) is not None and not isinstance(hparams[key], list | tuple):
            check_limit(hparams[key], limit, f"{source} ({key})")
    overrides = hparams.get("vision_overrides")
    if isinstance(overrides, Mapping):
        check_model_config(overrides, f"{source} (vision_overrides)")
    if isinstance(hparams.get("vision_name"), Mapping):
        check_model_config(hparams["vision_name"], f"{source} (vision_name)")


def _inside_package(class_path: str) -> bool:
    return class_path.split(":", 1)[0].split(".", 1)[0] == "panoviz_callback"


def _described_spec(state: Mapping[str, Any], class_path: str, common: dict[str, Any]) -> ModelSpec:
    described = state["vision_stage"]
    enc_path, res_path = state.get("encoder_path"), state.get("resampler_path")
    if not isinstance(enc_path, str) or (res_path is not None and not isinstance(res_path, str)):
        raise ModelSpecError("the checkpoint's PanoVizCallback state names no encoder attribute path")
    if res_path is not None and not described.get("resampler"):
        raise ModelSpecError(
            f"the checkpoint was written by `{class_path}`, whose resampler the callback could not describe; "
            f"panoviz does not import a module named in a file on its own: rerun with --module {class_path} "
            "(it imports that module) or --resampler none")
    prefixes = {"encoder": f"{enc_path}.", "resampler": f"{res_path}." if res_path else None}
    return ModelSpec("described", f"{class_path.rsplit(':', 1)[-1]} (rebuilt from the callback's description)",
                     dict(described), None, prefixes, **common)


def _require(hparams: Mapping[str, Any], names: tuple[str, ...], have_config: bool, config_name: str,
             what: str) -> None:
    missing = [n for n in names if not hparams.get(n)]
    if not missing:
        return
    listed = ", ".join(f"`{n}`" for n in missing)
    where = f"nor {config_name}" if have_config else "and no --config was given"
    raise ModelSpecError(
        f"the model cannot be rebuilt: {listed} is in neither the hyper_parameters of {what} {where}; add "
        f"`vision_name: <local save_pretrained folder or cached hub name>` to "
        f"{'the config' if have_config else 'a YAML file and pass it with --config path/to/config.yaml'}"
    )


def _callback_state(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    callbacks = ckpt.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    for key, value in callbacks.items():
        if str(key).startswith(_CALLBACK_KEY) and isinstance(value, Mapping) and "settings" in value:
            return dict(value)
    return None


#: Our Lightning classes recorded by the callback -> their vision-stage builder without Lightning (fast start).
_LIGHTNING_FREE = {"panoviz_callback.models.module:PanoVisionModule": "panoviz_callback.models.stage:PanoVisionStage"}


def _import_class(spec: str, origin: str, *, allowed: bool) -> type:
    """Import ``pkg.mod:Class``: only inside this package unless ``allowed`` (named by the user or trusted)."""
    if ":" in spec:
        module_name, _, qualname = spec.partition(":")
    else:
        module_name, _, qualname = spec.rpartition(".")
    if not module_name or not qualname or not all(p.isidentifier() for p in (module_name + "." + qualname).split(".")):
        raise ModelSpecError(f"{origin}: expected a class as 'pkg.module:ClassName', got {spec!r}")
    if not allowed and not _inside_package(spec):
        raise ModelSpecError(
            f"{origin} names the class `{module_name}:{qualname}`; panoviz does not import a module named in a file "
            f"on its own: rerun with --module {module_name}:{qualname} to import it")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - a module may fail to import for any reason
        hint = " (modules in the current folder need PYTHONPATH=.)" if isinstance(err, ModuleNotFoundError) else ""
        raise ModelSpecError(f"{origin}: cannot import module '{module_name}' ({type(err).__name__}: "
                             f"{_first_line(err)}){hint}") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelSpecError(f"{origin}: module '{module_name}' has no attribute '{qualname}'")
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelSpecError(f"{origin}: '{spec}' is not a torch.nn.Module / LightningModule class")
    return obj


# ------------------------------------------------------------------------------------------- building
def build_model(spec: ModelSpec, ckpt: Mapping[str, Any], *, strict: bool = False,
                device: torch.device | str = "cpu", log: Log | None = None,
                allow_missing: bool = False) -> CheckpointModel:
    """Build the encoder and resampler of ``spec`` and load the checkpoint's weights into them.

    Raises:
        ModelSpecError: the parts cannot be built from the information given.
        WeightsError: a weight has the wrong shape, or (``strict``) any key is missing or unexpected.
    """
    log = log or _warn
    state_dict = ckpt["state_dict"]
    if spec.kind == "panollava":
        from panoviz_callback import panollava

        return panollava.build(spec, state_dict, strict=strict, device=device, log=log, allow_missing=allow_missing)
    if spec.kind == "module":
        encoder, resampler, prefixes = _build_module(spec)
    else:
        prefixes = dict(spec.prefixes)
        try:
            if spec.kind == "panoviz":
                encoder, resampler = _build_vision_stage(spec.cls, spec.hparams,
                                                         _has_weights(state_dict, prefixes["encoder"]))
            else:
                encoder, resampler = build_described(spec, state_dict)
        except ModelSpecError:
            raise
        except (ValueError, TypeError, OSError) as err:
            raise ModelSpecError(f"cannot build the vision encoder/resampler of {spec.source}: "
                                 f"{_first_line(err)}") from None
        if prefixes.get("resampler") is None:
            resampler = None
    report = LoadReport(prefixes={"encoder": prefixes["encoder"]})
    _load_part("encoder", encoder, state_dict, prefixes["encoder"], report, align=True)
    if report.loaded["encoder"] == 0 and not report.unexpected["encoder"] and spec.kind == "panoviz" \
            and str(spec.hparams.get("vision_name")) != "tiny":
        report.missing["encoder"] = []  # a frozen encoder that was not saved: its pretrained weights were loaded
        log(f"note: the checkpoint holds no encoder weights under '{prefixes['encoder']}'; the encoder keeps the "
            f"pretrained weights of {spec.hparams.get('vision_name')}")
    if resampler is not None:
        report.prefixes["resampler"] = prefixes.get("resampler")
        _load_part("resampler", resampler, state_dict, prefixes.get("resampler"), report, align=False)
    finish_load(report, strict, log, allow_missing)
    for part in (encoder, resampler):
        if isinstance(part, nn.Module):
            part.requires_grad_(False).eval().to(device)
    return CheckpointModel(encoder=encoder, resampler=resampler, spec=spec, report=report)


def load_model(path: str | os.PathLike, *, config: str | os.PathLike | None = None, module: str | None = None,
               encoder: str | None = None, resampler: str | None = None, strict: bool = False,
               device: torch.device | str = "cpu", log: Log | None = None, trust: bool = False,
               allow_missing: bool = False) -> CheckpointModel:
    """:func:`read_checkpoint` + :func:`load_config` + :func:`describe_model` + :func:`build_model`."""
    ckpt = read_checkpoint(path, log, trust=trust)
    cfg = load_config(config) if config is not None else None
    spec = describe_model(ckpt, config=cfg, module=module, encoder=encoder, resampler=resampler, trust=trust)
    return build_model(spec, ckpt, strict=strict, device=device, log=log, allow_missing=allow_missing)


def load_vision_stage(checkpoint: str | os.PathLike, config: str | os.PathLike | None = None, *,
                      module: str | None = None, strict: bool = True, trust: bool = False,
                      device: torch.device | str = "cpu", log: Log | None = None) -> CheckpointModel:
    """The vision stage of a checkpoint, for notebooks and scripts: the one public entry point.

    Returns a :class:`CheckpointModel` whose ``encoder`` maps views ``(V, 3, S, S)`` to tokens, whose
    ``resampler`` (with the normalisation the model applied before it, where it had one) maps the
    encoder's tokens to what the model computed, and whose ``views`` are the view settings the
    model was trained with (``{"strategy", "image_size", "options"}``, for
    :func:`~panoviz_callback.views.make_views`). Missing or partial weights are an error
    (``strict=True``): a randomly initialised part is never returned silently.

    Example::

        >>> stage = load_vision_stage("runs/demo/checkpoints/last.ckpt")  # doctest: +SKIP
        >>> views = make_views(load_panorama("room.jpg"), stage.views["strategy"], stage.views["image_size"],
        ...                    **stage.views["options"])  # doctest: +SKIP
        >>> feats = extract_features(stage.encoder, views.pixels)  # doctest: +SKIP
    """
    return load_model(checkpoint, config=config, module=module, strict=strict, device=device, log=log, trust=trust)


def _build_module(spec: ModelSpec) -> tuple[nn.Module, nn.Module | None, dict[str, str | None]]:
    from panoviz_callback.lookup import ENCODER_SEARCH, RESAMPLER_SEARCH

    cls = spec.cls
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in spec.hparams.items()
              if not k.startswith("_") and (takes_any or (k in params and k != "self"))}
    required = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
    if required:
        raise ModelSpecError(f"cannot build {spec.source}: the checkpoint's hyper_parameters lack "
                             f"{', '.join(map(repr, required))}; give them under `init_args:` in --config")
    try:
        root = cls(**kwargs)
    except Exception as err:  # noqa: BLE001 - user code may raise anything
        raise ModelSpecError(f"cannot build {spec.source} from the checkpoint's hyper_parameters "
                             f"({type(err).__name__}: {_first_line(err)})") from None
    enc_path = spec.prefixes.get("encoder")
    res_path = spec.prefixes.get("resampler")
    encoder, enc_path = _resolve(root, enc_path, ENCODER_SEARCH, "encoder", None)
    if encoder is None:
        raise ModelSpecError(f"cannot find the vision encoder of {spec.source}: none of {', '.join(ENCODER_SEARCH)} "
                             "exists; pass --encoder path.to.module")
    resampler = None
    if res_path != "none":
        resampler, res_path = _resolve(root, res_path, RESAMPLER_SEARCH, "resampler", encoder)
    return encoder, resampler, {"encoder": f"{enc_path}.", "resampler": f"{res_path}." if resampler else None}


def _resolve(root: nn.Module, path: str | None, search: tuple[str, ...], what: str,
             exclude: Any) -> tuple[Any, str | None]:
    from panoviz_callback.lookup import find_module

    try:
        found, path = find_module(root, path or "auto", search, what, exclude=exclude,
                                  accept=lambda m: isinstance(m, nn.Module))
    except AttributeError:
        found = None
    if path and not isinstance(found, nn.Module):
        raise ModelSpecError(f"`{type(root).__name__}` has no module at `{path}` (--{what})")
    return found, path


def _has_weights(state_dict: Mapping[str, Any], prefix: str | None) -> bool:
    """True when ``state_dict`` holds a key under ``prefix``."""
    return prefix is not None and any(k.startswith(prefix) for k in state_dict)


def _build_vision_stage(cls: type, hparams: Mapping[str, Any], has_weights: bool) -> tuple[Any, Any]:
    """``cls.build_vision_stage(hparams)``, skipping the pretrained encoder weights when the checkpoint has its own.

    ``pretrained=False`` is passed only to a ``build_vision_stage`` that takes it.
    """
    build = cls.build_vision_stage
    try:
        params = inspect.signature(build).parameters.values()
    except (TypeError, ValueError):
        params = ()
    if any(p.name == "pretrained" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return build(hparams, pretrained=not has_weights)
    return build(hparams)


