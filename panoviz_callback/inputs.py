"""The runner's inputs: images from the command line, the callback's probe, the output folder, the device.

Every image gets a safe, unique name (:func:`image_names`): its path below the images' common
folder, with separators, ``..`` and leading dots removed, clashes numbered. Sizes recorded in a
checkpoint's probe are capped (:data:`~panoviz_callback.checkpoint.LIMITS`) before anything is loaded.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from panoviz_callback._io import safe_name
from panoviz_callback.panorama import IMAGE_SUFFIXES

__all__ = ["UsageError", "ImageSource", "resolve_images", "image_names", "callback_probe", "check_output_dir",
           "resolve_device"]

Log = Callable[[str], None]


class UsageError(ValueError):
    """The command line cannot be acted on (wrong option, path naming nothing, device missing)."""


# ------------------------------------------------------------------------------------------- inputs
@dataclass
class ImageSource:
    """One panorama to analyse: a file, or the callback's probe (``spec``)."""

    label: str
    stem: str
    path: Path | None = None
    spec: dict[str, Any] | None = None

    @property
    def recorded(self) -> str | None:
        """The ``image`` entry of the JSON report (None for an in-memory probe)."""
        return None if self.path is None else str(self.path)


def resolve_images(patterns: Sequence[str]) -> list[ImageSource]:
    """Expand ``--image`` arguments (files, folders, glob patterns) to image files, in order, without repeats.

    Raises:
        UsageError: a path that does not exist, a folder or pattern without images.
    """
    found: list[Path] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UsageError(f"--image folder '{p}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
        elif p.exists():
            files = [p]
        elif glob.has_magic(pattern):
            files = sorted(Path(f) for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                           if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UsageError(f"--image pattern '{pattern}' matches no images ({', '.join(IMAGE_SUFFIXES)})")
        else:
            raise UsageError(f"--image '{p}' does not exist")
        found += files
    unique = list(dict.fromkeys(f.absolute() for f in found))
    return [ImageSource(label=str(f), stem=name, path=f) for f, name in zip(unique, image_names(unique))]


def _safe_name(text: str) -> str:
    return safe_name(text, "image")


def image_names(paths: Sequence[Path]) -> list[str]:
    """Safe, unique names for images: their paths relative to the common folder, without the suffix.

    ``a/x.jpg`` and ``b/x.jpg`` become ``a_x`` and ``b_x``; separators, ``..`` and leading dots
    never survive; names that still clash (also ignoring case) get ``-2``, ``-3``, ... checked
    against every final name.

    Example:
        >>> image_names([Path("/p/a/x.jpg"), Path("/p/b/x.jpg"), Path("/p/b/...jpg")])
        ['a_x', 'b_x', 'b_']
    """
    if not paths:
        return []
    root = Path(os.path.commonpath([str(Path(p).parent) for p in paths]))
    raw = []
    for p in paths:
        rel = Path(p).relative_to(root)
        parts = [*rel.parts[:-1], rel.stem]
        raw.append(_safe_name("_".join(parts)))
    reserved = {n.lower() for n in raw}
    seen: set[str] = set()
    names = []
    for name in raw:
        final, k = name, 1
        while final.lower() in seen or (final != name and final.lower() in reserved):
            k += 1
            final = f"{name}-{k}"
        seen.add(final.lower())
        names.append(final)
    return names


def callback_probe(state: Mapping[str, Any] | None) -> ImageSource:
    """The probe panorama recorded by :class:`~panoviz_callback.PanoVizCallback`.

    Raises:
        UsageError: the checkpoint has no callback probe (then ``--image`` is needed).
    """
    spec = (state or {}).get("probe")
    if not isinstance(spec, Mapping) or spec.get("kind") not in ("synthetic", "path", "tensor"):
        raise UsageError("no --image given and the checkpoint holds no PanoVizCallback probe; pass --image PATH")
    spec = dict(spec)
    from panoviz_callback.checkpoint import ModelSpecError, check_limit

    try:
        if spec["kind"] == "synthetic":
            check_limit(spec.get("height", 512), "probe height", "the checkpoint's probe")
        if spec.get("max_width") is not None:
            check_limit(spec["max_width"], "probe max_width", "the checkpoint's probe")
        if spec["kind"] == "tensor":
            shape = tuple(getattr(spec.get("pixels"), "shape", ()))
            if len(shape) != 3 or shape[0] != 3:
                raise UsageError(f"the checkpoint's probe tensor has shape {shape}, expected (3, H, W)")
            check_limit(shape[1], "probe height", "the checkpoint's probe")
            check_limit(shape[2], "probe width", "the checkpoint's probe")
    except ModelSpecError as err:
        raise UsageError(f"{err}; pass --image PATH") from None
    if spec["kind"] == "path":
        path = Path(spec["path"])
        if not path.is_file():
            raise UsageError(f"the callback's probe '{path}' no longer exists; pass --image PATH")
        return ImageSource(label=f"callback probe {path}", stem=_safe_name(path.stem), path=path, spec=spec)
    what = "synthetic panorama" if spec["kind"] == "synthetic" else "tensor"
    return ImageSource(label=f"callback probe ({what})", stem="probe", spec=spec)


def check_output_dir(path: Path) -> None:
    """Fail early when ``path`` cannot become a writable folder (nothing is created here).

    Raises:
        UsageError: ``path`` or an ancestor is a file, or the nearest existing folder is not writable.
    """
    p = Path(os.path.abspath(path))
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--output_dir '{path}' cannot be created: '{probe}' is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".panoviz-write-test-", dir=probe)
    except OSError as err:
        raise UsageError(f"--output_dir '{path}' is not writable ({err.strerror or err} in '{probe}')") from None
    os.close(fd)
    os.unlink(name)


def resolve_device(choice: str, log: Log) -> torch.device:
    """``"auto"`` (CUDA if available, else the CPU with a note), ``"cuda"`` or ``"cpu"``.

    Raises:
        UsageError: ``"cuda"`` on a machine where CUDA is not available.
    """
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        built = "a build without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU " \
                                                                         "is visible"
        raise UsageError(f"--device cuda: CUDA is not available on this machine (torch {torch.__version__}, {built}); "
                         "use --device cpu or --device auto")
    if choice == "auto" and not available:
        log("note: CUDA is not available; running on the CPU")
    return torch.device("cuda" if choice != "cpu" and available else "cpu")
