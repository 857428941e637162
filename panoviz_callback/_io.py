"""Atomic file writes: a crash or Ctrl-C never leaves a half-written output file."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "safe_name"]


def safe_name(text: str, fallback: str = "x") -> str:
    """A file/folder name: separators and odd characters become ``_``, no leading dots, at most 120 characters.

    Example:
        >>> safe_name("../a b"), safe_name("..", "image")
        ('_a_b', 'image')
    """
    out = re.sub(r"[^\w.=+@-]", "_", text).lstrip(".").rstrip(". ")
    return out[:120] or fallback


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the same folder (so ``os.replace`` is atomic) and keeps
    the target's suffix (so writers that look at the extension, like matplotlib, work).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(out) as tmp:
        ...     _ = tmp.write_text("hello")
        >>> out.read_text()
        'hello'
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
