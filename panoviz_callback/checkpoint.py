"""Rebuild only the vision encoder and the resampler of a training checkpoint.

Three kinds of checkpoints are understood (a language model is never instantiated):

- ``"panoviz"``: self-describing. Written by a run with
  :class:`~panoviz_callback.PanoVizCallback` (its state names the LightningModule class,
  the encoder/resampler attribute paths, the probe, the settings and the PCA states) or
  from :class:`~panoviz_callback.models.PanoVisionModule` (``hyper_parameters`` with
  ``vision_name`` and ``resampler_type``, weights under ``vision_encoder.*`` /
  ``resampler.*``). A class with a ``build_vision_stage(hparams)`` method builds just the
  two parts (with ``pretrained=False`` when the checkpoint holds the encoder weights and the
  method takes that argument); any other class is handled like ``"module"``.
- ``"module"``: any LightningModule given as ``pkg.mod:Class`` (``--module``), built from
  the checkpoint's ``hyper_parameters``; the encoder/resampler attribute paths are given
  or found the way the callback finds them (the class's ``encoder_attr`` /
  ``resampler_attr``, then :data:`~panoviz_callback.callback.ENCODER_SEARCH`).
- ``"panollava"``: the original system's layout: encoder weights under
  ``model.vision_encoder.*`` or ``model.vision_backbone.encoder.*``, resampler weights under
  ``model.resampler_module.resampler.*`` or ``model.resampler.*``, ``hyper_parameters``
  with ``vision_name``, ``resampler_type`` (``"mlp"``) and ``latent_dimension``; crop
  geometry from ``datamodule_hyper_parameters``. The encoder comes from
  :func:`~panoviz_callback.features.load_vision_encoder` and the resampler from
  :func:`~panoviz_callback.models.build_resampler`.

A YAML ``config`` (e.g. the training ``config.yaml``) fills what the checkpoint lacks:
keys are looked up at any nesting depth (shallowest first): ``vision_name``,
``resampler_type``, ``latent_dimension``, ``resampler_depth``, ``crop_strategy``,
``image_size``, ``fov_deg`` (or ``fov``), ``overlap`` (or ``overlap_ratio``), ``pitches``,
``crop_options``, and for ``"module"`` checkpoints ``class_path``/``module`` and
``init_args`` (LightningCLI style).

Checkpoints are read with ``torch.load(weights_only=True)`` (memory-mapped, so the
weights of parts that are not rebuilt are never read); only a checkpoint that holds
other Python objects is unpickled fully, after a note saying so.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointError", "ModelSpecError", "WeightsError", "ModelSpec", "LoadReport", "CheckpointModel",
    "read_checkpoint", "load_config", "describe_model", "build_model", "load_model", "checkpoint_name",
    "PANOLLAVA_ENCODER_PREFIXES", "PANOLLAVA_RESAMPLER_PREFIXES",
]

PANOLLAVA_ENCODER_PREFIXES = ("model.vision_encoder.", "model.vision_backbone.encoder.")
PANOLLAVA_RESAMPLER_PREFIXES = ("model.resampler_module.resampler.", "model.resampler.")
_PANOVIZ_PREFIXES = ("vision_encoder.", "resampler.")
_CALLBACK_KEY = "PanoVizCallback"
_NO_DESCRIPTION = ("this checkpoint holds no model configuration; pass --config path/to/config.yaml or "
                   "--module pkg.mod:Class")
_GENERIC_DIRS = frozenset({
    "checkpoints", "checkpoint", "ckpt", "ckpts", "lightning_logs", "logs", "log", "runs", "outputs", "output",
    "results", "models", "weights", "saved_models", "tb_logs", "files", "last", "best",
})
_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image or audio)"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"BM", "a BMP image"),
)
_GEOMETRY_KEYS = {"fov_deg": ("fov_deg", "fov"), "overlap": ("overlap", "overlap_ratio"), "pitches": ("pitches",)}
Log = Callable[[str], None]


class CheckpointError(ValueError):
    """The checkpoint file is missing, unreadable or not a checkpoint."""


class ModelSpecError(ValueError):
    """The model cannot be rebuilt from what the checkpoint, ``--config`` and ``--module`` say."""


class WeightsError(RuntimeError):
    """The checkpoint's weights do not fit the rebuilt encoder or resampler."""


@dataclass
class ModelSpec:
    """What to build (cheap to make: no network, no weights).

    Attributes:
        kind: ``"panoviz"``, ``"module"`` or ``"panollava"``.
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
class LoadReport:
    """How the checkpoint's weights fitted: per part, the prefix and the missing/unexpected keys."""

    prefixes: dict[str, str | None] = field(default_factory=dict)
    loaded: dict[str, int] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no key is missing or unexpected."""
        return not any(self.missing.values()) and not any(self.unexpected.values())

    def problems(self, limit: int = 3) -> list[str]:
        """One line per part with missing or unexpected keys (counts and the first ``limit`` names)."""
        lines = []
        for part, prefix in self.prefixes.items():
            missing, unexpected = self.missing.get(part, []), self.unexpected.get(part, [])
            if not missing and not unexpected:
                continue
            bits = []
            for what, keys in (("missing", missing), ("unexpected", unexpected)):
                if keys:
                    more = ", ..." if len(keys) > limit else ""
                    bits.append(f"{len(keys)} {what} ({', '.join(keys[:limit])}{more})")
            lines.append(f"{part} weights under '{prefix or ''}': " + "; ".join(bits))
        return lines


@dataclass
class CheckpointModel:
    """The rebuilt encoder and resampler (eval mode, no gradients) and what the checkpoint says."""

    encoder: nn.Module
    resampler: nn.Module | None
    spec: ModelSpec
    report: LoadReport


# ------------------------------------------------------------------------------------------- reading
def checkpoint_name(path: str | os.PathLike) -> str:
    """The run name of a checkpoint: its parent folder, or its file stem when the parent is generic.

    Generic parents: ``checkpoints``, ``lightning_logs``, ``version_N``, ``logs``, ``runs``, ...

    Example:
        >>> checkpoint_name("runs/vicreg_a/last.ckpt"), checkpoint_name("exp/checkpoints/epoch=0.ckpt")
        ('vicreg_a', 'epoch=0')
    """
    p = Path(os.path.abspath(os.fspath(path)))
    parent = p.parent.name
    generic = not parent or parent.lower() in _GENERIC_DIRS or re.fullmatch(r"version_\d+", parent)
    name = p.stem if generic else parent
    return name.replace(os.sep, "_").lstrip(".") or "checkpoint"


def _sniff(path: Path) -> tuple[bool, str | None]:
    """``(is_zip, reason)``: ``reason`` says what the file is when it is surely not a checkpoint."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return True, None
    if head[:1] == b"\x80":  # a pickle (torch's legacy format)
        return False, None
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return False, what
    if len(head) >= 9 and head[8:9] == b"{":
        return False, "a safetensors file (save the Lightning checkpoint .ckpt instead)"
    if head.lstrip()[:1] in (b"{", b"[", b"#") or head[:4].isascii() and head.strip().isascii():
        return False, "a text file"
    return False, "an unrecognised file format"


def read_checkpoint(path: str | os.PathLike, log: Log | None = None) -> dict[str, Any]:
    """Load a Lightning checkpoint (or a bare state dict) onto the CPU.

    ``weights_only=True`` and memory-mapped first; a checkpoint that needs full unpickling
    is loaded again with ``weights_only=False`` after ``log`` says so.

    Returns:
        The checkpoint dict, with a ``"state_dict"`` entry.

    Raises:
        CheckpointError: missing, a folder, unreadable, empty, another kind of file, damaged,
            or not a checkpoint.
    """
    log = log or _warn
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        raise CheckpointError(f"checkpoint '{p}' is a folder, expected a .ckpt file (a DeepSpeed checkpoint "
                              "folder must first be converted with convert_zero_checkpoint_to_fp32_state_dict)")
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist")
    try:
        size = p.stat().st_size
        is_zip, other = _sniff(p)
    except OSError as err:
        raise CheckpointError(f"checkpoint '{p}' cannot be read ({err.strerror or err})") from None
    if size == 0:
        raise CheckpointError(f"checkpoint '{p}' is empty (0 bytes)")
    if other is not None:
        raise CheckpointError(f"'{p}' is not a PyTorch/Lightning checkpoint: it is {other}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(f"checkpoint '{p}' is damaged or not a PyTorch checkpoint "
                                  f"(UnpicklingError: {_first_line(err)})") from None
        reason = str(err).strip().splitlines()
        detail = next((line for line in reason if "Unsupported global" in line), reason[0] if reason else "")
        log(f"note: '{p}' holds Python objects that weights_only loading refuses ({detail.strip()[:160]}); "
            "loading it with full unpickling, which runs code stored in the file: use only checkpoints you trust")
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=is_zip)
        except Exception as err2:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
            raise CheckpointError(f"checkpoint '{p}' cannot be unpickled ({type(err2).__name__}: "
                                  f"{_first_line(err2)})") from None
    except Exception as err:  # noqa: BLE001 - zip/pickle/EOF errors all mean a damaged file
        raise CheckpointError(f"checkpoint '{p}' is damaged or not a PyTorch checkpoint "
                              f"({type(err).__name__}: {_first_line(err)})") from None
    if isinstance(ckpt, Mapping) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        return dict(ckpt)
    if isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"state_dict": dict(ckpt)}  # a bare state dict saved with torch.save(model.state_dict())
    keys = sorted(map(str, ckpt))[:6] if isinstance(ckpt, Mapping) else None
    what = f"a dict with keys {keys}" if keys is not None else f"a {type(ckpt).__name__}"
    raise CheckpointError(f"'{p}' is not a Lightning checkpoint: it holds {what}, no 'state_dict'")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``--config`` YAML file (a mapping).

    Raises:
        ModelSpecError: the file is missing, unreadable, not valid YAML or not a mapping.
    """
    import yaml

    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise ModelSpecError(f"--config '{p}' " + ("is a folder, expected a YAML file" if p.is_dir()
                                                    else "does not exist"))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelSpecError(f"--config '{p}' cannot be read ({err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or _first_line(err)
        raise ModelSpecError(f"--config '{p}' is not valid YAML ({problem}{where})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ModelSpecError(f"--config '{p}' must hold a mapping of keys to values, got a {type(data).__name__}")
    return dict(data)


# ------------------------------------------------------------------------------------------- describing
def describe_model(
    ckpt: Mapping[str, Any], *, config: Mapping[str, Any] | None = None, module: str | None = None,
    encoder: str | None = None, resampler: str | None = None, config_name: str = "--config",
) -> ModelSpec:
    """Work out what to build from the checkpoint, ``config`` and ``module`` (no weights are touched).

    Args:
        ckpt: from :func:`read_checkpoint`.
        config: from :func:`load_config` (fills what the checkpoint lacks).
        module: ``"pkg.mod:Class"``, the LightningModule class to rebuild (overrides the checkpoint's).
        encoder: attribute path of the encoder in that class (``"model.vision_encoder"``).
        resampler: attribute path of the resampler (``"none"``: no resampler level).
        config_name: how to name the config in messages.

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

    class_path = module or _config_class(config)
    if class_path is None and state is not None and state.get("module_class"):
        class_path = state["module_class"]
        try:
            cls = _import_class(class_path, "the checkpoint's PanoVizCallback state")
        except ModelSpecError as err:
            if _find_prefix(keys, PANOLLAVA_ENCODER_PREFIXES) is None and "vision_name" not in hparams:
                raise ModelSpecError(f"{err}; pass --module pkg.mod:Class or --config") from None
            class_path = None
    elif class_path is not None:
        if not isinstance(class_path, str):
            raise ModelSpecError(f"{config_name}: `class_path` must be a string 'pkg.mod:Class', got {class_path!r}")
        cls = _import_class(class_path, "--module" if module else config_name)

    if class_path is not None:
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

    enc_prefix = _find_prefix(keys, PANOLLAVA_ENCODER_PREFIXES)
    res_prefix = _find_prefix(keys, PANOLLAVA_RESAMPLER_PREFIXES)
    if enc_prefix is not None or res_prefix is not None:  # a frozen encoder may not have been saved
        enc_prefix = enc_prefix or PANOLLAVA_ENCODER_PREFIXES[0]
        _require(hparams, ("vision_name",), bool(config), config_name, "a PanoLLaVA checkpoint")
        return ModelSpec("panollava", f"PanoLLaVA layout ({enc_prefix}*)", hparams, None,
                         {"encoder": enc_prefix, "resampler": res_prefix}, **common)
    if _find_prefix(keys, _PANOVIZ_PREFIXES[:1]) is not None and ("vision_name" in hparams or config):
        _require(hparams, ("vision_name",), bool(config), config_name, "this checkpoint")
        from panoviz_callback.models import PanoVisionModule

        prefixes = {"encoder": _PANOVIZ_PREFIXES[0],
                    "resampler": _PANOVIZ_PREFIXES[1] if _find_prefix(keys, _PANOVIZ_PREFIXES[1:]) else None}
        return ModelSpec("panoviz", "PanoVisionModule layout (vision_encoder.*)", hparams, PanoVisionModule,
                         prefixes, **common)
    if config:
        raise ModelSpecError(f"the model cannot be rebuilt: {config_name} names no `vision_name` or `class_path` "
                             "and the checkpoint's weights are in no known layout (model.vision_encoder.*, "
                             "vision_encoder.*); pass --module pkg.mod:Class")
    raise ModelSpecError(_NO_DESCRIPTION)


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


def _import_class(spec: str, origin: str) -> type:
    if ":" in spec:
        module_name, _, qualname = spec.partition(":")
    else:
        module_name, _, qualname = spec.rpartition(".")
    if not module_name or not qualname or not all(p.isidentifier() for p in (module_name + "." + qualname).split(".")):
        raise ModelSpecError(f"{origin}: expected a class as 'pkg.module:ClassName', got {spec!r}")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # like `python -m`: the current folder's modules can be named
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - a module may fail to import for any reason
        raise ModelSpecError(f"{origin}: cannot import module '{module_name}' ({type(err).__name__}: "
                             f"{_first_line(err)})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelSpecError(f"{origin}: module '{module_name}' has no attribute '{qualname}'")
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelSpecError(f"{origin}: '{spec}' is not a torch.nn.Module / LightningModule class")
    return obj


# ------------------------------------------------------------------------------------------- building
def build_model(spec: ModelSpec, ckpt: Mapping[str, Any], *, strict: bool = False,
                device: torch.device | str = "cpu", log: Log | None = None) -> CheckpointModel:
    """Build the encoder and resampler of ``spec`` and load the checkpoint's weights into them.

    Raises:
        ModelSpecError: the parts cannot be built from the information given.
        WeightsError: a weight has the wrong shape, or (``strict``) any key is missing or unexpected.
    """
    log = log or _warn
    state_dict = ckpt["state_dict"]
    if spec.kind == "module":
        encoder, resampler, prefixes = _build_module(spec)
    else:
        prefixes = dict(spec.prefixes)
        try:
            if spec.kind == "panoviz":
                encoder, resampler = _build_vision_stage(spec.cls, spec.hparams,
                                                         _has_weights(state_dict, prefixes["encoder"]))
            else:
                encoder, resampler = _build_panollava(spec, state_dict, log)
        except ModelSpecError:
            raise
        except (ValueError, TypeError, OSError) as err:
            raise ModelSpecError(f"cannot build the vision encoder/resampler of {spec.source}: "
                                 f"{_first_line(err)}") from None
        if prefixes.get("resampler") is None:
            resampler = None
    report = LoadReport(prefixes={"encoder": prefixes["encoder"]})
    _load_part("encoder", encoder, state_dict, prefixes["encoder"], report, align=True)
    if spec.kind == "panollava" and report.loaded["encoder"] == 0 and not report.unexpected["encoder"]:
        report.missing["encoder"] = []  # built with the pretrained weights of vision_name
        log(f"note: the checkpoint holds no encoder weights under '{prefixes['encoder']}'; the encoder keeps the "
            f"pretrained weights of {spec.hparams['vision_name']}")
    if spec.kind == "panollava" and prefixes.get("resampler") is None:
        log(f"note: the checkpoint holds no resampler weights (under {' or '.join(PANOLLAVA_RESAMPLER_PREFIXES)}); "
            "only the encoder level is analysed")
    if resampler is not None:
        report.prefixes["resampler"] = prefixes.get("resampler")
        _load_part("resampler", resampler, state_dict, prefixes.get("resampler"), report, align=False)
    if not report.ok:
        if strict:
            raise WeightsError("the checkpoint's weights do not match the model (--strict): "
                               + " | ".join(report.problems()))
        for line in report.problems():
            log(f"warning: {line}")
    for part in (encoder, resampler):
        if isinstance(part, nn.Module):
            part.requires_grad_(False).eval().to(device)
    return CheckpointModel(encoder=encoder, resampler=resampler, spec=spec, report=report)


def load_model(path: str | os.PathLike, *, config: str | os.PathLike | None = None, module: str | None = None,
               encoder: str | None = None, resampler: str | None = None, strict: bool = False,
               device: torch.device | str = "cpu", log: Log | None = None) -> CheckpointModel:
    """:func:`read_checkpoint` + :func:`load_config` + :func:`describe_model` + :func:`build_model`."""
    ckpt = read_checkpoint(path, log)
    cfg = load_config(config) if config is not None else None
    spec = describe_model(ckpt, config=cfg, module=module, encoder=encoder, resampler=resampler)
    return build_model(spec, ckpt, strict=strict, device=device, log=log)


def _build_module(spec: ModelSpec) -> tuple[nn.Module, nn.Module | None, dict[str, str | None]]:
    from panoviz_callback.callback import ENCODER_SEARCH, RESAMPLER_SEARCH

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
    from panoviz_callback.callback import find_module

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


def _build_panollava(spec: ModelSpec, state_dict: Mapping[str, Any], log: Log) -> tuple[nn.Module, nn.Module]:
    from panoviz_callback.features import load_vision_encoder
    from panoviz_callback.models.resamplers import MLPResampler, build_resampler

    h = spec.hparams
    encoder = load_vision_encoder(h["vision_name"], pretrained=not _has_weights(state_dict, spec.prefixes["encoder"]))
    in_dim = _hidden_size(encoder)
    kind = str(h.get("resampler_type") or "mlp").lower()
    prefix = spec.prefixes.get("resampler")
    if kind == "identity" or prefix is None:
        return encoder, build_resampler("identity", in_dim)
    if kind != "mlp":
        raise ModelSpecError(f"resampler_type {kind!r} of a PanoLLaVA checkpoint is not supported (supported: 'mlp', "
                             "'identity'); rebuild it with --module pkg.mod:Class")
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    linears = sorted((int(m.group(1)), weights[k].shape) for k in weights
                     if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)) and weights[k].dim() == 2)
    out_dim = h.get("latent_dimension")
    if linears:  # depth and width as trained (PanoLLaVA versions differ), output size as configured
        if out_dim is None:
            out_dim = int(linears[-1][1][0])
            log(f"note: `latent_dimension` not given; using {out_dim} from the resampler's weights")
        hidden = int(linears[0][1][0]) if len(linears) > 1 else None
        return encoder, MLPResampler(in_dim, int(out_dim), hidden_dim=hidden, depth=len(linears))
    if out_dim is None:
        raise ModelSpecError("the model cannot be rebuilt: `latent_dimension` is missing and the checkpoint holds no "
                             "resampler weights to read it from; add `latent_dimension: N` to --config")
    return encoder, build_resampler("mlp", in_dim, int(out_dim), depth=int(h.get("resampler_depth") or 3))


def _hidden_size(encoder: nn.Module) -> int:
    cfg = getattr(encoder, "config", None)
    cfg = getattr(cfg, "vision_config", None) or cfg
    size = getattr(cfg, "hidden_size", None)
    if size is None:
        raise ModelSpecError("cannot read the encoder's hidden size from its config (`config.hidden_size`)")
    return int(size)


def _load_part(part: str, module: nn.Module, state_dict: Mapping[str, Any], prefix: str | None,
               report: LoadReport, *, align: bool) -> None:
    expected = list(module.state_dict().keys())
    sliced = {k[len(prefix):]: v for k, v in state_dict.items() if prefix and k.startswith(prefix)}
    if align:
        sliced = _align_keys(sliced, expected)
    try:
        result = module.load_state_dict(sliced, strict=False)
    except RuntimeError as err:
        sizes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        detail = "; ".join(sizes[:3]) or _first_line(err)
        raise WeightsError(f"the {part} weights under '{prefix}' do not fit the rebuilt {part}: {detail}") from None
    report.loaded[part] = len(sliced) - len(result.unexpected_keys)
    report.missing[part] = list(result.missing_keys)
    report.unexpected[part] = [f"{prefix}{k}" for k in result.unexpected_keys]


def _align_keys(sliced: dict[str, Any], expected: list[str]) -> dict[str, Any]:
    """Add or strip one leading component (``vision_model.``, ``model.``) so the keys match the module's."""
    if not sliced:
        return sliced
    want = set(expected)
    heads = {k.split(".", 1)[0] + "." for k in expected if "." in k} | {"vision_model.", "model.", "encoder."}
    candidates = [sliced]
    for head in heads:
        candidates.append({head + k: v for k, v in sliced.items()})
        if all(k.startswith(head) for k in sliced):
            candidates.append({k[len(head):]: v for k, v in sliced.items()})
    return max(candidates, key=lambda c: len(want.intersection(c)))


# ------------------------------------------------------------------------------------------- helpers
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
