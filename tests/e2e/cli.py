"""Run ``subsidyctl`` as an operator does: a separate process against running services."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


async def subsidyctl(*args: str) -> tuple[int, dict[str, Any], str]:
    """The exit code, the JSON object on stdout (``{}`` if none) and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "subsidyctl",  # the operator's command: subsidyctl quote / import / ...
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if out.strip() else {}, err.decode()
