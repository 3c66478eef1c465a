"""The auditor's second process: ``python -m services.audit.replay 1|0`` (with or without the
digests the store cross-check needs) folds the events :class:`services.audit.verify.ReplayProcess`
pipes to it (see :func:`services.audit.verify.serve_replay`)."""

from __future__ import annotations

import sys

from services.audit.verify import serve_replay

if __name__ == "__main__":
    serve_replay(sys.stdin.buffer, sys.stdout.buffer, sys.argv[1:] == ["1"])
