"""The local stack: ``up`` (``make run``), ``smoke`` (``make smoke``) and ``seed``.

  subsidyctl up [--seed-demo] [--run-dir DIR] [--base-port N]   serve until Ctrl-C
  subsidyctl smoke                  a throwaway stack, one checkout, one JSON line, stop
  subsidyctl seed [--base-port N] [--run-dir DIR]   the demo campaign on a running stack

``up`` issues the demo identities into ``RUN_DIR/certs/<role>-<name>/`` at each start and renews
them while it serves; ``seed`` acts as those demo users (an operator funds and files, an
approver approves, the demo platform registers the consumers).

``up`` tells people where everything is (a table of endpoints on a terminal) and prints the
fund-monitoring dashboard's login URL on a line ``dashboard: URL``; with ``--json`` it prints one
JSON object instead once the stack serves. It exits 1 if the stack cannot start or a
service dies; ``smoke`` exits 1 with every service's log tail on stderr if anything fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from grpc.aio import AioRpcError
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from rich.console import Console
from rich.table import Table

from services.kernel.telemetry import configure_tracing

from .. import demo
from ..ports import QUIESCE, RESUME, SERVICES, STATE, Ports

if TYPE_CHECKING:  # imported by the commands that start a stack (it brings NATS and SQLAlchemy)
    from ..localstack import LocalStack
from ..stack import StackError
from ..stack.certs import PLATFORM_DEMO, dir_name
from .common import (
    DEFAULT_BASE_PORT,
    DEFAULT_RUN_DIR,
    EXIT_NO,
    BasePortOpt,
    JsonOpt,
    RunDirOpt,
    demo_identities,
    emit,
    local_address,
    note,
)

app = typer.Typer()
PANEL = "Local stack"
RENEW_CHECK_S = 60.0  # how often up checks whether a demo identity is due for renewal


def endpoints(base_port: int) -> dict[str, str]:
    return {s: local_address(s, base_port) for s in Ports(base_port).services}


def example(base_port: int, certs: Path = DEFAULT_RUN_DIR / "certs") -> str:
    me = certs / dir_name(PLATFORM_DEMO)
    return (
        "Try a subsidised checkout (a platform's calls: register, claim, reserve, capture):\n"
        f"  .venv/bin/subsidyctl checkout --base-port {base_port} --sku demo-fridge-g1 "
        "--price-fen 1200000\n"
        "Or call the gRPC API directly with the demo platform's certificate (mutual TLS only;\n"
        "server reflection is on), e.g. with grpcurl:\n"
        f"  grpcurl -cacert {me}/ca.crt -cert {me}/tls.crt -key {me}/tls.key "
        f'-d \'{{"pool_id": "pingshan-2025"}}\' '
        f"{local_address('ledger', base_port)} "
        "subsidy.v1.LedgerService/GetBudget"
    )


def announce(
    stack: LocalStack,
    base_port: int,
    seeded: dict[str, Any] | None,
    json_only: bool,
    dashboard: str = "",
) -> None:
    """What ``up`` prints once everything serves: today's text, a table on a terminal, or JSON."""
    where = stack.endpoints()
    if json_only:
        line: dict[str, Any] = {"serving": True, "endpoints": where}
        line.update(logs=str(stack.logs), traces=str(stack.traces))
        if dashboard:
            line["dashboard"] = dashboard
        if seeded is not None:
            line["demo_campaign"] = seeded
        emit(line)
        return
    if seeded is not None:
        print("demo campaign:", json.dumps(seeded, ensure_ascii=False), flush=True)
    console = Console()
    if console.is_terminal:
        table = Table("part", "address", title="endpoints")
        for part, address in where.items():
            table.add_row(part, address)
        console.print(table)
    else:
        print("endpoints:", json.dumps(where, indent=2), flush=True)
    print(f"logs: {stack.logs}   traces: {stack.traces}", flush=True)
    print(example(base_port, stack.certs), flush=True)
    if dashboard:  # the login token is in the URL, as Jupyter prints it
        print(f"dashboard: {dashboard}", flush=True)
    print("serving; press Ctrl-C to stop", flush=True)


NatsNodesOpt = Annotated[
    int,
    typer.Option(
        min=1,
        max=5,
        envvar="SUBSIDY_LOCAL_NATS_NODES",
        help="NATS JetStream nodes: 1, or a cluster (e.g. 3, streams at that many replicas)",
    ),
]


WorkersOpt = Annotated[
    int,
    typer.Option(
        min=1,
        max=16,
        envvar="SUBSIDY_LOCAL_WORKERS",
        help="worker processes per service, sharing its port (SUBSIDY_WORKERS)",
    ),
]


@app.command(rich_help_panel=PANEL)
def up(
    seed_demo: Annotated[bool, typer.Option(help="create the demo campaign")] = False,
    run_dir: RunDirOpt = DEFAULT_RUN_DIR,
    base_port: BasePortOpt = DEFAULT_BASE_PORT,
    nats_nodes: NatsNodesOpt = 1,
    workers: WorkersOpt = 1,
    json_only: JsonOpt = False,
) -> None:
    """Start the whole stack locally and serve until Ctrl-C."""
    from ..localstack import LocalStack

    stack = LocalStack(
        run_dir.resolve(), Ports(base_port), durable=True, nats_nodes=nats_nodes, workers=workers
    )
    try:
        stack.start()
    except StackError as exc:
        note(f"subsidyctl up: {exc}")
        raise typer.Exit(EXIT_NO) from None
    stop = {"now": False}
    wanted: list[signal.Signals] = []  # QUIESCE / RESUME from `subsidyctl restore`

    def request_stop(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(QUIESCE, lambda signum, frame: wanted.append(QUIESCE))
    signal.signal(RESUME, lambda signum, frame: wanted.append(RESUME))
    state = stack.run_dir / STATE
    try:
        seeded = asyncio.run(_seed(stack.endpoints())) if seed_demo else None
        try:
            dashboard = stack.start_dashboard()
        except StackError as exc:  # the platform still serves; say why there is no dashboard
            note(f"subsidyctl up: no dashboard: {exc}")
            dashboard = ""
        announce(stack, base_port, seeded, json_only, dashboard)
        state.write_text("serving\n")
        next_renewal_check = time.monotonic() + RENEW_CHECK_S
        while not stop["now"]:
            while wanted:
                _quiesce_or_resume(stack, wanted.pop(0), state)
            dead = stack.dead()
            if dead:
                for s in dead:
                    note(f"{s} exited unexpectedly:\n{stack.tail(s)}")
                raise typer.Exit(EXIT_NO)
            if time.monotonic() >= next_renewal_check:
                next_renewal_check = time.monotonic() + RENEW_CHECK_S
                try:
                    renewed = stack.issue_identities(only_due=True)
                except Exception as exc:  # keep serving; the next check tries again
                    note(f"renewing the demo identities failed: {exc!r}")
                else:
                    if renewed and not json_only:
                        note(f"renewed {', '.join(renewed)}")
            time.sleep(0.5)
    finally:
        note("stopping ...")
        state.unlink(missing_ok=True)
        stack.stop()
        note("stopped")


def _quiesce_or_resume(stack: LocalStack, asked: signal.Signals, state: Path) -> None:
    """Stop or start the services for ``subsidyctl restore`` and say so in ``state`` (a failed
    start is written there too, and ``up`` keeps the infrastructure running)."""
    if asked == QUIESCE:
        note("restore: stopping the services, resetting the events stream ...")
        stack.stop_services()
        try:
            stack.reset_event_stream()
        except Exception as exc:  # the restore must not go on with a bus that drops events
            state.write_text(f"failed: resetting the events stream: {exc!r}\n")
            return
        state.write_text("quiesced\n")
        return
    note("restore: starting the services ...")
    try:
        stack.start_services()
    except StackError as exc:
        stack.stop_services()
        state.write_text(f"failed: {exc}\n")
        note(f"restore: the services did not start: {exc}")
        return
    state.write_text("serving\n")
    note("restore: serving again")


async def _seed(where: dict[str, str], identities: demo.Identities | None = None) -> dict[str, Any]:
    client = demo.Client(where, identities)
    try:
        return await demo.seed(client, random.Random())
    finally:
        await client.close()


@app.command(rich_help_panel=PANEL)
def seed(
    base_port: BasePortOpt = DEFAULT_BASE_PORT,
    run_dir: RunDirOpt = DEFAULT_RUN_DIR,
    json_only: JsonOpt = False,
) -> None:
    """Create the demo campaign on a running stack (safe to run again).

    Acts as the stack's demo operator, approver and platform (RUN_DIR/certs)."""
    identities = demo_identities(run_dir)
    emit(asyncio.run(_seed(endpoints(base_port), identities)))


async def _smoke(stack: LocalStack) -> dict[str, Any]:
    client = demo.Client(stack.endpoints())
    try:
        seeded = await demo.seed(client, random.Random(), {**demo.load_demo(), "consumers": 0})
        result = await demo.checkout(
            client,
            random.Random(),
            pool_id=seeded["pool_id"],
            sku="demo-fridge-g1",
            price_fen=1_200_000,
        )
        from ..localstack import wait_until_audited

        size = await wait_until_audited(stack, client)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        provider = trace.get_tracer_provider()
        if isinstance(provider, TracerProvider):
            provider.force_flush()  # the platform's own spans, batched in this process
        # Services export spans in batches every 200 ms: wait until the audit log's span is in
        # and the count has held still for a second.
        spans: list[dict[str, object]] = []
        steady = 0
        while loop.time() < deadline and steady < 5:
            await asyncio.sleep(0.2)
            now = stack.trace_spans(result["trace_id"])
            audited = any(
                str(s["name"]).startswith("audit-log consume SubsidyCaptured") for s in now
            )
            steady = steady + 1 if audited and len(now) == len(spans) else 0
            spans = now
        return {
            "subsidy_fen": result["subsidy_fen"],
            "budget_available_fen": result["budget_available_fen"],
            "audit_entries": size,
            "trace_spans": len(spans),
        }
    finally:
        await client.close()


@app.command(rich_help_panel=PANEL)
def smoke(nats_nodes: NatsNodesOpt = 1, json_only: JsonOpt = False) -> None:
    """A throwaway stack on free ports, one checkout as a platform runs it, one JSON line."""
    from ..localstack import LocalStack, free_base

    with tempfile.TemporaryDirectory(prefix="subsidy-smoke-") as tmp:
        stack = LocalStack(Path(tmp), Ports(free_base()), durable=False, nats_nodes=nats_nodes)
        configure_tracing("smoke", trace_file=stack.traces / "platform.jsonl")
        try:
            stack.start()
            line = asyncio.run(_smoke(stack))
        except Exception as exc:
            why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, AioRpcError) else exc
            note(f"subsidyctl smoke: FAILED: {type(exc).__name__}: {why}")
            for s in (*SERVICES, "identity_sim"):
                note(f"--- {s} log tail ---\n{stack.tail(s)}")
            raise typer.Exit(EXIT_NO) from None
        finally:
            with contextlib.suppress(Exception):
                stack.stop()
    emit(line, ensure_ascii=True)
