"""Run ``subsidyctl`` as an operator does: a separate process against running services, with
an identity (a directory of tls.crt, tls.key, ca.crt) as its ``--identity``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from services.kernel import tls
from subsidyctl.stack.certs import write_identity


def identity_dir(source: tls.CertificateSource, directory: Path) -> Path:
    """Write ``source``'s current certificate where ``--identity`` reads it; returns the
    directory. E.g. ``identity_dir(infra.identities(Caller(Role.OPERATOR, "op-li")), tmp)``."""
    write_identity(directory, source.current())
    return directory


async def subsidyctl(*args: str, identity: Path | None = None) -> tuple[int, dict[str, Any], str]:
    """The exit code, the JSON object on stdout (``{}`` if none) and stderr. ``identity`` is
    passed as ``--identity``; the caller's own SUBSIDY_* variables are not (a developer's
    $SUBSIDY_IDENTITY must not change what a test presents)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    extra = ["--identity", str(identity)] if identity is not None else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "subsidyctl",  # the operator's command: subsidyctl quote / import / ...
        *args,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if out.strip() else {}, err.decode()
