"""Every ``subsidyctl`` command starts by importing the command line; what only a starting
stack needs (subsidyctl.localstack, the NATS client, the event bus) is imported by the commands
that start one, and what only the database commands need (psycopg, SQLAlchemy, Alembic, the
event store: backup, restore, schema) by those commands, not by every command
(docs/benchmarks.md: the suite runs ``subsidyctl`` about a hundred times). Checked in a fresh
interpreter, as a command starts."""

from __future__ import annotations

import json
import subprocess
import sys

STACK_ONLY = (
    "subsidyctl.localstack",
    "services.kernel.bus",
    "nats",
    "psycopg",
    "sqlalchemy",
    "alembic",
    "services.kernel.eventstore",
)


def loaded_after(*modules: str) -> list[str]:
    """Which of STACK_ONLY a fresh interpreter holds after importing ``modules``."""
    probe = (
        f"import json, sys; import {', '.join(modules)}; "
        f"print(json.dumps(sorted(m for m in {STACK_ONLY!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def test_the_command_line_imports_nothing_only_a_starting_stack_needs() -> None:
    assert loaded_after("subsidyctl.cli") == []


def test_starting_a_stack_and_the_schema_tools_still_bring_them() -> None:
    # The probe can fail: the local stack and the schema tools do bring every one of them.
    assert loaded_after("subsidyctl.localstack", "services.kernel.schema") == sorted(STACK_ONLY)
