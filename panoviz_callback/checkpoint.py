"""Read a training checkpoint as data: the generic reader under the runner and :func:`load_vision_stage`.

Checkpoints are unpickled with :func:`~panoviz_callback.safeload.safe_torch_load`: tensors and
plain containers are rebuilt, every other object becomes an inert record of its saved state
(read as plain data by :func:`~panoviz_callback.safeload.to_plain`), and nothing named in the
file is imported or called. A checkpoint whose pickle stands for a function call
(``os.system(...)``, ``eval(...)``) cannot be read that way and is refused, unless the caller
passes ``trust=True`` (the CLI's ``--trust_checkpoint``): full unpickling, which runs the code
stored in the file.

Numbers read from a checkpoint or config that size work or memory (probe size, view size,
number of views, layer index, model widths) are checked against :data:`LIMITS` before use.
"""

from __future__ import annotations

import numbers
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from panoviz_callback._io import safe_name as _safe_name

__all__ = [
    "CheckpointError", "ModelSpecError", "WeightsError", "LIMITS", "check_limit",
    "read_checkpoint", "load_config", "checkpoint_name", "run_name",
]

_GENERIC_DIRS = frozenset({
    "checkpoints", "checkpoint", "ckpt", "ckpts", "lightning_logs", "logs", "log", "runs", "outputs", "output",
    "results", "models", "weights", "saved_models", "tb_logs", "files", "last", "best", "wandb",
})
_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image or audio)"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"BM", "a BMP image"),
)
#: Caps on sizes read from files: ``name: (min, max)``. Values outside are refused with a sentence.
LIMITS: dict[str, tuple[float, float]] = {
    "probe height": (16, 8192),
    "probe width": (32, 16384),
    "probe max_width": (32, 16384),
    "image_size": (8, 2048),
    "tile_render_size": (8, 4096),
    "number of views": (1, 64),
    "layer": (-256, 256),
    "n_components": (1, 64),
    "num_queries": (1, 4096),
    "hidden size": (1, 16384),
    "intermediate size": (1, 65536),
    "number of layers": (1, 256),
    "attention heads": (1, 256),
    "patch size": (1, 1024),
    "fov_deg": (1e-3, 360),
    "num_views": (1, 64),
}
Log = Callable[[str], None]


class CheckpointError(ValueError):
    """The checkpoint file is missing, unreadable, not a checkpoint, or not readable as data."""


class ModelSpecError(ValueError):
    """The model cannot be rebuilt from what the checkpoint, ``--config`` and ``--module`` say."""


class WeightsError(RuntimeError):
    """The checkpoint's weights do not fit the rebuilt encoder or resampler."""


def check_limit(value: Any, name: str, source: str) -> Any:
    """Return ``value`` when it lies within ``LIMITS[name]``.

    Raises:
        ModelSpecError: not a number, or out of range; the message names ``source`` and the range.

    Example:
        >>> check_limit(224, "image_size", "the checkpoint")
        224
    """
    lo, hi = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ModelSpecError(f"{source}: {name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ModelSpecError(f"{source}: {name} {value} is outside the supported range [{lo:g}, {hi:g}]")
    return value


# ------------------------------------------------------------------------------------------- names
def _run_folder(p: Path) -> str | None:
    """The nearest non-generic ancestor folder, with the ``version_N`` folder below it if any."""
    version = None
    for parent in p.parents:
        name = parent.name
        if not name:
            return version
        if re.fullmatch(r"version_\d+", name):
            version = version or name
        elif name.lower() not in _GENERIC_DIRS:
            return f"{name}-{version}" if version else name
    return version


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
    return _safe_name(p.stem if generic else parent)


def run_name(path: str | os.PathLike) -> str:
    """The default output folder name of a checkpoint: ``{run folder}-{checkpoint stem}``.

    The run folder is the nearest non-generic ancestor (skipping ``checkpoints``,
    ``lightning_logs``, ``version_N``, ...), so two runs' ``last.ckpt`` never share a folder.

    Example:
        >>> run_name("runs/vicreg_a/checkpoints/last.ckpt")
        'vicreg_a-last'
        >>> run_name("runs/b/lightning_logs/version_3/checkpoints/epoch=1.ckpt")
        'b-version_3-epoch=1'
    """
    p = Path(os.path.abspath(os.fspath(path)))
    run = _run_folder(p)
    return _safe_name(f"{run}-{p.stem}" if run else p.stem)


# ------------------------------------------------------------------------------------------- reading
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


def read_checkpoint(path: str | os.PathLike, log: Log | None = None, *, trust: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint (or a bare state dict) onto the CPU, as data.

    Memory-mapped (the weights of parts that are not rebuilt are never read). Objects of
    classes other than tensors and plain types are returned as plain data (the dicts of their
    saved fields, see :func:`~panoviz_callback.safeload.to_plain`); the ``state_dict`` must hold
    tensors only.

    Args:
        path: the ``.ckpt`` file.
        log: prints one line (notes).
        trust: unpickle fully, running any code stored in the file (only for files you trust).

    Returns:
        The checkpoint dict, with a ``"state_dict"`` entry.

    Raises:
        CheckpointError: missing, a folder, unreadable, empty, another kind of file, damaged, not a
            checkpoint, or (without ``trust``) a pickle that calls a function.
    """
    from panoviz_callback import safeload

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
        if trust:
            log(f"note: --trust_checkpoint: unpickling '{p}' fully, which runs any code stored in it")
            ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=is_zip)
        else:
            ckpt = safeload.safe_torch_load(p, mmap=is_zip)
    except Exception as err:  # noqa: BLE001 - zip/pickle/EOF errors all mean a damaged file
        raise CheckpointError(f"checkpoint '{p}' is damaged or not a PyTorch checkpoint "
                              f"({type(err).__name__}: {_first_line(err)})") from None
    if not trust:
        ckpt = _as_data(ckpt, p, log)
    if isinstance(ckpt, Mapping) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        return dict(ckpt)
    if isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"state_dict": dict(ckpt)}  # a bare state dict saved with torch.save(model.state_dict())
    keys = sorted(map(str, ckpt))[:6] if isinstance(ckpt, Mapping) else None
    what = f"a dict with keys {keys}" if keys is not None else f"a {type(ckpt).__name__}"
    raise CheckpointError(f"'{p}' is not a Lightning checkpoint: it holds {what}, no 'state_dict'")


def _as_data(ckpt: Any, p: Path, log: Log) -> Any:
    """Refuse function calls and non-tensor weights; turn the other records into plain data."""
    from panoviz_callback import safeload

    records = list(safeload.inert_records(ckpt))
    calls = [(where, rec) for where, rec in records if rec.is_call]
    if calls:
        where, rec = calls[0]
        at = f" at `{where}`" if where else ""
        raise CheckpointError(
            f"checkpoint '{p}' holds {safeload.describe(rec)}{at}, which panoviz does not run; if you trust where "
            "the file comes from, pass --trust_checkpoint (full unpickling runs the code stored in it)")
    if isinstance(ckpt, safeload.InertObject):
        raise CheckpointError(f"'{p}' is not a Lightning checkpoint: it holds {safeload.describe(ckpt)}")
    if not isinstance(ckpt, Mapping):
        return ckpt
    state = ckpt.get("state_dict")
    if isinstance(state, Mapping):
        bad = next(((k, v) for k, v in state.items() if not isinstance(v, torch.Tensor) and v is not None), None)
        if bad is not None and isinstance(bad[1], safeload.InertObject):
            raise CheckpointError(f"checkpoint '{p}' holds {safeload.describe(bad[1])} in its state_dict at "
                                  f"`{bad[0]}` where a tensor was expected; pass --trust_checkpoint to unpickle it "
                                  "fully if you trust the file")
    if records:
        names = sorted({rec.global_name for _, rec in records})
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        log(f"note: read {len(names)} class(es) of '{p.name}' as plain data without importing them ({shown})")
        return {k: (v if k == "state_dict" else safeload.to_plain(v)) for k, v in ckpt.items()}
    return ckpt


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``--config`` YAML file (a mapping), with YAML's safe loader (no Python tags).

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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)

