"""subsidyctl: the operator's and auditor's command line.

subsidyctl up [--seed-demo]     start the whole stack locally and serve until Ctrl-C
subsidyctl smoke                start a throwaway stack, run one checkout, print one JSON line
subsidyctl seed                 create the demo campaign on a running stack
subsidyctl checkout             run one subsidised checkout against a running stack
subsidyctl quote --category C --grade G --price-fen N [--policy V]
                                the subsidy for one item, answered by the running catalog
subsidyctl import FILE.csv      bulk-import products (all or nothing, or --only-good-rows)
subsidyctl sales-ledger         export the sales ledger (销售台账) as CSV or XLSX
subsidyctl pause | resume       emergency switch for a category or the whole campaign
subsidyctl policy draft | approve   maker-checker publication of a policy version
subsidyctl audit verify         recompute the audit chain, rebuild every budget from the log
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.kernel.telemetry import configure_tracing

from . import audit_cli, catalog_cli, demo
from .localstack import SERVICES, LocalStack, Ports, free_base, wait_until_audited
from .stack import StackError

DEFAULT_RUN_DIR = Path(os.environ.get("SUBSIDY_RUN_DIR", "run"))
DEFAULT_BASE_PORT = int(os.environ.get("SUBSIDY_BASE_PORT", "7100"))


def _endpoints(base_port: int) -> dict[str, str]:
    ports = Ports(base_port)
    return {s: f"127.0.0.1:{p}" for s, p in ports.services.items()}


def _example(base_port: int) -> str:
    return (
        "Try a subsidised checkout (a platform's calls: register, claim, reserve, capture):\n"
        f"  .venv/bin/subsidyctl checkout --base-port {base_port} --sku demo-fridge-g1 "
        "--price-fen 1200000\n"
        "Or call the gRPC API directly (server reflection is on), e.g. with grpcurl:\n"
        f'  grpcurl -plaintext -d \'{{"pool_id": "pingshan-2025"}}\' '
        f"127.0.0.1:{Ports(base_port).services['ledger']} "
        "subsidy.v1.LedgerService/GetBudget"
    )


def cmd_up(args: argparse.Namespace) -> int:
    stack = LocalStack(Path(args.run_dir).resolve(), Ports(args.base_port), durable=True)
    try:
        stack.start()
    except StackError as exc:
        print(f"subsidyctl up: {exc}", file=sys.stderr)
        return 1
    stop = {"now": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if args.seed_demo:
            seeded = asyncio.run(_seed(stack.endpoints()))
            print("demo campaign:", json.dumps(seeded, ensure_ascii=False), flush=True)
        print("endpoints:", json.dumps(stack.endpoints(), indent=2), flush=True)
        print(f"logs: {stack.logs}   traces: {stack.traces}", flush=True)
        print(_example(args.base_port), flush=True)
        print("serving; press Ctrl-C to stop", flush=True)
        while not stop["now"]:
            dead = stack.dead()
            if dead:
                for s in dead:
                    print(f"{s} exited unexpectedly:\n{stack.tail(s)}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        stack.stop()
        print("stopped", file=sys.stderr, flush=True)


async def _seed(endpoints: dict[str, str]) -> dict[str, Any]:
    client = demo.Client(endpoints)
    try:
        return await demo.seed(client, random.Random())
    finally:
        await client.close()


def cmd_seed(args: argparse.Namespace) -> int:
    print(json.dumps(asyncio.run(_seed(_endpoints(args.base_port))), ensure_ascii=False))
    return 0


def cmd_checkout(args: argparse.Namespace) -> int:
    # The platform side of the trace: its spans join the services' in the local run folder.
    traces = DEFAULT_RUN_DIR / "traces"
    configure_tracing("platform", trace_file=traces / "platform.jsonl" if traces.is_dir() else None)

    async def run() -> dict[str, Any]:
        client = demo.Client(_endpoints(args.base_port))
        try:
            return await demo.checkout(
                client, random.Random(), pool_id=args.pool, sku=args.sku, price_fen=args.price_fen
            )
        finally:
            await client.close()

    print(json.dumps(asyncio.run(run()), ensure_ascii=False))
    return 0


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


def cmd_smoke(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="subsidy-smoke-") as tmp:
        stack = LocalStack(Path(tmp), Ports(free_base()), durable=False)
        configure_tracing("smoke", trace_file=stack.traces / "platform.jsonl")
        try:
            stack.start()
            line = asyncio.run(_smoke(stack))
        except Exception as exc:
            print(f"subsidyctl smoke: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            for s in (*SERVICES, "identity_sim"):
                print(f"--- {s} log tail ---\n{stack.tail(s)}", file=sys.stderr)
            return 1
        finally:
            with contextlib.suppress(Exception):
                stack.stop()
    print(json.dumps(line))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="subsidyctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole stack locally; Ctrl-C stops it")
    up.add_argument("--seed-demo", action="store_true", help="create the demo campaign")
    up.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="data, logs and traces")
    up.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    up.set_defaults(fn=cmd_up)
    smoke = sub.add_parser("smoke", help="throwaway stack, one checkout, one JSON line")
    smoke.set_defaults(fn=cmd_smoke)
    seed = sub.add_parser("seed", help="create the demo campaign on a running stack")
    seed.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    seed.set_defaults(fn=cmd_seed)
    co = sub.add_parser("checkout", help="one subsidised checkout against a running stack")
    co.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    co.add_argument("--pool", default="pingshan-2025")
    co.add_argument("--sku", default="demo-fridge-g1")
    co.add_argument("--price-fen", type=int, default=1_200_000)
    co.set_defaults(fn=cmd_checkout)
    catalog_cli.add_commands(sub)  # quote, import, sales-ledger, pause, resume, policy
    audit_cli.add_commands(sub)  # audit verify
    args = parser.parse_args(argv)
    code: int = (args.fn if hasattr(args, "fn") else args.func)(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
