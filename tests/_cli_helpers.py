"""Helpers for tests that run the ``panoviz`` command in-process."""

from __future__ import annotations

from panoviz_callback.cli import main


def _run(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``panoviz ARGV``."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err: str, match: str) -> None:
    """Exactly one problem line on stderr, containing ``match``, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("panoviz: error:")]
    assert len(errors) == 1, err
    assert match in errors[0], errors[0]
    assert "Traceback" not in err
