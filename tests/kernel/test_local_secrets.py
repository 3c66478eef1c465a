"""The local stack's root Vault token file is never readable by others, not even briefly."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from subsidyctl.localstack import write_private

_watched: Path | None = None
_exposed: list[str] = []


def _watch(event: str, args: tuple[Any, ...]) -> None:
    """At every audited operation, check the watched file: if it holds anything, it must be
    private. (An audit hook cannot be removed: it does nothing unless a test sets _watched.)"""
    path = _watched
    if path is None:
        return
    try:
        st = path.stat()
    except OSError:
        return
    if st.st_size and stat.S_IMODE(st.st_mode) & 0o077:
        _exposed.append(f"{event}: {stat.S_IMODE(st.st_mode):o} with {st.st_size} bytes")


sys.addaudithook(_watch)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Path]:
    global _watched
    path = tmp_path / "LOCAL-ONLY-vault-token"
    old_umask = os.umask(0o022)  # the common default: files are created 0644
    _exposed.clear()
    _watched = path
    try:
        yield path
    finally:
        _watched = None
        os.umask(old_umask)


def test_the_token_is_never_in_a_file_others_can_read(watched: Path) -> None:
    write_private(watched, "s.root-token")
    global _watched
    _watched = None
    assert _exposed == []
    assert stat.S_IMODE(watched.stat().st_mode) == 0o600
    assert watched.read_text() == "s.root-token"


def test_an_existing_readable_file_is_made_private_and_replaced(watched: Path) -> None:
    watched.write_text("an older, longer token")
    watched.chmod(0o644)
    write_private(watched, "s.new")
    assert stat.S_IMODE(watched.stat().st_mode) == 0o600
    assert watched.read_text() == "s.new"
