"""The committed protobuf/gRPC code matches proto/ (make proto regenerates it)."""

from __future__ import annotations

import subprocess
import sys


def test_generated_code_is_fresh() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "subsidyctl.proto", "check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + "\nrun `make proto` and commit the result"
