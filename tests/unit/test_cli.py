"""subsidyctl's command line without services: its commands, bad input, unreachable services,
the identities it presents, the variables it reads, and the progress it draws. (The answers of
running services: tests/e2e/test_catalog_import.py, tests/e2e/test_catalog_isolated.py, and
`subsidyctl smoke` in tests/e2e/test_processes.py.)"""

from __future__ import annotations

import ast
import datetime as dt
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rich.console import Console

from services.kernel import tls
from services.kernel.identity import Caller
from services.kernel.settings import CliSettings
from subsidy.v1 import catalog_pb2
from subsidyctl.cli import app, main
from subsidyctl.cli.catalog import import_answer, tell_rejected
from subsidyctl.cli.common import pick
from subsidyctl.cli.progress import PhaseProgress
from subsidyctl.cli.stack import announce
from subsidyctl.localstack import LocalStack
from subsidyctl.stack import free_port
from subsidyctl.stack.certs import DEMO_IDENTITIES, dir_name, write_identity

CLI_SOURCES = Path(__file__).resolve().parents[2] / "subsidyctl" / "cli"

# Every command the docs, the Makefile and the chart name, with its group.
COMMANDS = [
    "up", "smoke", "seed", "checkout", "quote", "import", "sales-ledger", "pause", "resume",
    "policy", "audit", "certs",
]  # fmt: skip


def self_signed(who: Caller) -> tls.Certificate:
    """A certificate of the right shape for ``who`` (no service ever checks it here)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, who.principal)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(who.spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return tls.Certificate(pem, key_pem, pem)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder with the demo identities in certs/, as ``make run`` leaves it."""
    for who in DEMO_IDENTITIES:
        write_identity(tmp_path / "certs" / dir_name(who), self_signed(who))
    return tmp_path


def test_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    for command in COMMANDS:
        assert f" {command} " in shown, command
    assert main(["policy", "--help"]) == 0
    assert " draft " in capsys.readouterr().out
    assert main(["audit", "verify", "--help"]) == 0
    assert "--ledger" in capsys.readouterr().out
    assert main(["certs", "issue", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--role" in shown and "LOCAL-ONLY-vault-token" in shown


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
        ["pause", "--campaign", "--reason", "r", "--catalog", "{addr}"],
        ["policy", "approve", "v1", "--reason", "r", "--catalog", "{addr}"],
        [
            "policy", "draft", "{run}/policy.yaml", "--reason", "r", "--catalog", "{addr}",
            "--identity", "{run}/certs/operator-demo",
        ],
        ["audit", "verify", "--audit", "{addr}", "--ledger", "{addr}"],
        ["seed", "--base-port", "{base}"],
        ["checkout", "--base-port", "{base}", "--identity", "{run}/certs/platform-other"],
    ],
)  # fmt: skip
def test_an_unreachable_service_is_one_json_line_and_exit_3(args: list[str], run_dir: Path) -> None:
    """A separate process: each gRPC client runs its own event loop, as the operator's does.
    Its identities are the run folder's demo ones ($SUBSIDY_RUN_DIR) unless --identity says."""
    port = free_port()  # nothing listens there
    (run_dir / "policy.yaml").write_text("version: v1\n")
    argv = [a.format(addr=f"127.0.0.1:{port}", base=port - 1, run=run_dir) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "subsidyctl", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "SUBSIDY_RUN_DIR": str(run_dir)},
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
    certs = Path("/run/certs")

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
    assert (
        "grpcurl -cacert /run/certs/platform-demo/ca.crt -cert /run/certs/platform-demo/tls.crt "
        "-key /run/certs/platform-demo/tls.key " in text
    )
    assert "-plaintext" not in text
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


# --------------------------------------------------------------------------------------------
# identities


@pytest.mark.parametrize(
    ("args", "default"),
    [
        (["quote"], "platform-demo"),
        (["checkout"], "platform-demo"),
        (["import"], "operator-demo"),
        (["sales-ledger"], "operator-demo"),
        (["pause"], "operator-demo"),
        (["resume"], "operator-demo"),
        (["policy", "draft"], "operator-demo"),
        (["policy", "approve"], "approver-checker"),
        (["audit", "verify"], "auditor-demo"),
        (["audit", "prove"], "auditor-demo"),
    ],
)
def test_each_command_defaults_to_the_demo_identity_that_fits_it(
    args: list[str], default: str
) -> None:
    command: Any = typer.main.get_command(app)
    for word in args:
        command = command.commands[word]
    (option,) = [p for p in command.params if "--identity" in p.opts]
    assert option.envvar == "SUBSIDY_IDENTITY"
    assert option.help.endswith(f"$SUBSIDY_RUN_DIR/certs/{default})")


def test_a_missing_identity_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUBSIDY_RUN_DIR", str(tmp_path))
    assert main(["pause", "--campaign", "--reason", "r"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"subsidyctl pause: error: no certificate in {tmp_path}/certs/operator-demo "
        "(tls.crt, tls.key, ca.crt): start the local stack (make run), or pass --identity DIR\n"
    )
    assert main(["audit", "verify", "--identity", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith(
        f"subsidyctl audit verify: error: no certificate in {tmp_path}/nope"
    )


def test_certs_issue_refuses_bad_input_and_a_missing_stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["certs", "issue", "--out", str(tmp_path / "id"), "--run-dir", str(tmp_path)]
    assert main([*base, "--role", "platform", "--name", "JD!"]) == 2
    assert "Invalid value for '--name'" in capsys.readouterr().err
    assert main([*base, "--role", "chief", "--name", "x"]) == 2
    assert "Invalid value for '--role'" in capsys.readouterr().err
    assert main([*base, "--role", "platform", "--name", "jd", "--host", "localhost"]) == 2
    assert "only a service's certificate serves" in capsys.readouterr().err
    assert main([*base, "--role", "platform", "--name", "jd"]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith(f"subsidyctl certs issue: error: no Vault token at {tmp_path}/")
    assert not (tmp_path / "id").exists()


# --------------------------------------------------------------------------------------------
# the CLI's environment variables


def typer_envvars() -> dict[str, str]:
    """Every ``envvar`` of every option of every command: {variable: the command using it}."""
    found: dict[str, str] = {}

    def walk(command: Any, path: str) -> None:
        for param in command.params:
            names = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
            for name in names:
                if name:
                    found.setdefault(str(name), f"{path} {param.opts[0]}")
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "subsidyctl")
    return found


def environ_reads() -> set[str]:
    """Every variable the CLI's code looks up itself (os.environ / os.getenv with a literal)."""
    names: set[str] = set()
    for source in [*CLI_SOURCES.glob("*.py"), CLI_SOURCES.parent / "demo.py"]:
        for node in ast.walk(ast.parse(source.read_text())):
            text = ast.unparse(node) if isinstance(node, ast.Call | ast.Subscript) else ""
            if "environ" in text or "getenv" in text:
                for arg in ast.walk(node):
                    if isinstance(arg, ast.Constant) and str(arg.value).startswith("SUBSIDY_"):
                        names.add(str(arg.value))
    return names


def test_every_variable_the_cli_reads_is_declared_in_cli_settings() -> None:
    declared = {v.name for v in CliSettings.variables()}
    envvars = typer_envvars()
    undeclared = {name: where for name, where in envvars.items() if name not in declared}
    assert not undeclared, f"declare these in services.kernel.settings.CliSettings: {undeclared}"
    assert environ_reads() <= declared
    # and nothing is declared that no option reads (the actor comes from the certificate now)
    assert set(envvars) | environ_reads() == declared
    assert "SUBSIDY_ACTOR" not in declared


def test_the_check_sees_an_undeclared_envvar() -> None:
    """The check above would catch an option reading a variable nobody declared."""
    extra = typer.Typer()

    @extra.command()
    def probe(x: str = typer.Option("", envvar="SUBSIDY_NOT_DECLARED")) -> None:
        """a probe"""

    app.add_typer(extra, name="probe-only-in-this-test")
    try:
        assert typer_envvars()["SUBSIDY_NOT_DECLARED"].startswith("subsidyctl probe-only")
        with pytest.raises(AssertionError, match="SUBSIDY_NOT_DECLARED"):
            test_every_variable_the_cli_reads_is_declared_in_cli_settings()
    finally:
        app.registered_groups.pop()
    assert "SUBSIDY_NOT_DECLARED" not in typer_envvars()


def test_the_cli_variables_are_documented_as_declared() -> None:
    """docs/operations.md's table of subsidyctl's variables is CliSettings, row for row."""
    docs = (CLI_SOURCES.parents[1] / "docs" / "operations.md").read_text()
    expected = "\n".join(f"| `{v.name}` | {v.meaning} |" for v in CliSettings.variables())
    assert "| variable | meaning |\n|---|---|\n" + expected + "\n" in docs, expected
