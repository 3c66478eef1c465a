"""``python -m subsidyctl`` and the ``subsidyctl`` console script; the commands are in
:mod:`subsidyctl.cli`."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
