"""The ``panoviz`` command line (placeholder until the runner lands)."""

from __future__ import annotations

import argparse
import sys

from panoviz_callback import __version__

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="panoviz", description="Visualise a panoramic VLM's vision features.")
    parser.add_argument("--version", action="version", version=f"panoviz {__version__}")
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    return 0
