"""One chaos stack for the package: the short chaos run hits it first, then the dead-letter CLI
test (test_dlq_every_service.py) runs on what it left (a stack with the local ports a
`subsidyctl` command finds by ``SUBSIDY_BASE_PORT`` alone)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from subsidyctl.localstack import LocalStack
from tests.chaos import engine


@pytest.fixture(scope="package")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    run_dir: Path = tmp_path_factory.mktemp("chaos") / "run"
    stack = engine.chaos_stack(run_dir, log=io.StringIO())
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
