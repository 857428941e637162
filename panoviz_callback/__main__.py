"""``python -m panoviz_callback``: the same as the ``panoviz`` command."""

from panoviz_callback.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
