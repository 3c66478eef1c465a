"""subsidyctl's command line without services: its commands, bad input, unreachable services,
and the progress it draws. (The answers of running services: tests/e2e/test_catalog_import.py,
tests/e2e/test_catalog_isolated.py, and `subsidyctl smoke` in tests/e2e/test_processes.py.)"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from rich.console import Console

from subsidy.v1 import catalog_pb2
from subsidyctl.cli import main
from subsidyctl.cli.catalog import import_answer, tell_rejected
from subsidyctl.cli.common import pick
from subsidyctl.cli.progress import PhaseProgress
from subsidyctl.cli.stack import announce
from subsidyctl.localstack import LocalStack
from subsidyctl.stack import free_port

# Every command the docs, the Makefile and the chart name, with its group.
COMMANDS = [
    "up", "smoke", "seed", "checkout", "quote", "import", "sales-ledger", "pause", "resume",
    "policy", "audit",
]  # fmt: skip


def test_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    for command in COMMANDS:
        assert f" {command} " in shown, command
    assert main(["policy", "--help"]) == 0
    assert " draft " in capsys.readouterr().out
    assert main(["audit", "verify", "--help"]) == 0
    assert "--ledger" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["quote", "--category", "tv", "--price-fen", "1", "--grade", "9"],
            "subsidyctl quote: error: Invalid value for '--grade': a grade 1..5, "
            "or 0 / none for no efficiency grade",
        ),
        (["quote", "--price-fen", "1"], "subsidyctl quote: error: Missing option '--category'."),
        (
            ["quote", "--category", "tv", "--price-fen", "lots"],
            "subsidyctl quote: error: Invalid value for '--price-fen'",
        ),
        (["nope"], "subsidyctl: error: No such command 'nope'."),
        (
            ["pause", "--reason", "r"],
            "subsidyctl pause: error: give exactly one of --category CODE or --campaign",
        ),
        (
            ["resume", "--campaign", "--category", "tv", "--reason", "r"],
            "subsidyctl resume: error: give exactly one of --category CODE or --campaign",
        ),
        (["pause", "--campaign"], "subsidyctl pause: error: Missing option '--reason'."),
        (
            ["import", "/no/such/file.csv"],
            "subsidyctl import: error: cannot read /no/such/file.csv: No such file or directory",
        ),
        (
            ["policy", "draft", "/no/such/policy.yaml", "--reason", "r"],
            "subsidyctl policy draft: error: cannot read /no/such/policy.yaml: "
            "No such file or directory",
        ),
        (
            ["sales-ledger", "--format", "pdf"],
            "subsidyctl sales-ledger: error: Invalid value for '--format'",
        ),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(message), err


def test_a_group_without_its_command_shows_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy"]) == 2
    assert "approve" in "".join(capsys.readouterr())


@pytest.mark.parametrize(
    "args",
    [
        ["quote", "--category", "tv", "--price-fen", "100", "--catalog", "{addr}"],
        ["pause", "--campaign", "--reason", "r", "--actor", "op", "--catalog", "{addr}"],
        ["policy", "approve", "v1", "--reason", "r", "--actor", "ap", "--catalog", "{addr}"],
        ["audit", "verify", "--audit", "{addr}", "--ledger", "{addr}"],
        ["seed", "--base-port", "{base}"],
        ["checkout", "--base-port", "{base}"],
    ],
)
def test_an_unreachable_service_is_one_json_line_and_exit_3(args: list[str]) -> None:
    """A separate process: each gRPC client runs its own event loop, as the operator's does."""
    port = free_port()  # nothing listens there
    argv = [a.format(addr=f"127.0.0.1:{port}", base=port - 1) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "subsidyctl", *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert json.loads(proc.stderr)["error"]["code"] == "UNAVAILABLE"


def test_progress_off_a_terminal_is_a_line_per_phase_and_quarter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with PhaseProgress(console=Console(file=io.StringIO())) as bar:
        for done in range(0, 11):
            bar.update("VALIDATE", done, 10)
        bar.update("APPLY", 2, 2)
        bar.update("DONE", 2, 2)
    assert capsys.readouterr().err.splitlines() == [
        "validate: 0/10 rows (0%)",
        "validate: 3/10 rows (30%)",
        "validate: 5/10 rows (50%)",
        "validate: 8/10 rows (80%)",
        "validate: 10/10 rows (100%)",
        "apply: 2/2 rows (100%)",
        "done: 2/2 rows (100%)",
    ]
    with PhaseProgress(console=Console(file=io.StringIO()), plain=False) as bar:
        bar.update("FETCH", 1, 1)
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_a_rich_bar_per_phase(
    capsys: pytest.CaptureFixture[str],
) -> None:
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=100)
    with PhaseProgress(console=terminal) as bar:
        bar.update("VALIDATE", 5, 11)
        bar.update("VALIDATE", 11, 11)
        bar.update("APPLY", 2, 2)
        bar.update("DONE", 2, 2)
    drawn = screen.getvalue()
    assert "validate" in drawn and "11/11" in drawn and "apply" in drawn and "2/2" in drawn
    assert capsys.readouterr() == ("", "")  # nothing but the bar
    quiet = io.StringIO()
    with PhaseProgress(console=Console(file=quiet, force_terminal=True), quiet=True) as bar:
        bar.update("VALIDATE", 1, 1)
    assert quiet.getvalue() == ""


def rejected_import() -> catalog_pb2.ImportResult:
    return catalog_pb2.ImportResult(
        outcome="APPLIED_NOTHING",
        import_id="imp-1",
        total_rows=2,
        applied=0,
        rejected=[
            catalog_pb2.RowError(line=3, field="category", reason="UNKNOWN_CATEGORY", message="x")
        ],
        file_sha256="ab",
    )


def test_import_answer_and_its_notes(capsys: pytest.CaptureFixture[str]) -> None:
    result = rejected_import()
    assert json.dumps(import_answer(result)) == json.dumps(
        {
            "outcome": "APPLIED_NOTHING",
            "import_id": "imp-1",
            "total_rows": 2,
            "applied": 0,
            "rejected": [
                {"line": 3, "field": "category", "reason": "UNKNOWN_CATEGORY", "message": "x"}
            ],
            "file_sha256": "ab",
        }
    )
    tell_rejected(result)
    assert capsys.readouterr().err.splitlines() == [
        "line 3: UNKNOWN_CATEGORY: x",
        "1 bad row(s): nothing imported (fix them, or pass --only-good-rows)",
    ]
    screen = io.StringIO()
    tell_rejected(result, Console(file=screen, force_terminal=True, width=100))
    assert "rows not imported" in screen.getvalue() and "UNKNOWN_CATEGORY" in screen.getvalue()


def test_pick_keeps_the_order_and_makes_repeated_fields_lists() -> None:
    q = catalog_pb2.QuoteResponse(eligible=True, subsidy_fen=5, reasons=["A", "B"])
    assert list(pick(q, "reasons", "eligible", "subsidy_fen").items()) == [
        ("reasons", ["A", "B"]),
        ("eligible", True),
        ("subsidy_fen", 5),
    ]


class FakeStack:
    logs = Path("/run/logs")
    traces = Path("/run/traces")

    def endpoints(self) -> dict[str, str]:
        return {"catalog": "127.0.0.1:7101"}


def test_up_announces_itself_as_text_or_as_one_json_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stack = cast(LocalStack, FakeStack())
    seeded: dict[str, Any] = {"pool_id": "pingshan-2025"}
    announce(stack, 7100, seeded, json_only=False)
    text = capsys.readouterr().out
    assert text.startswith('demo campaign: {"pool_id": "pingshan-2025"}\nendpoints: {\n')
    assert "logs: /run/logs   traces: /run/traces\n" in text
    assert text.endswith("serving; press Ctrl-C to stop\n")
    announce(stack, 7100, seeded, json_only=True)
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line) == {
        "serving": True,
        "endpoints": {"catalog": "127.0.0.1:7101"},
        "logs": "/run/logs",
        "traces": "/run/traces",
        "demo_campaign": seeded,
    }
