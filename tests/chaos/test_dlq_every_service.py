"""``subsidyctl dlq list|show|replay`` without ``--service`` asks every service, on the local
stack it finds by ``SUBSIDY_BASE_PORT``: a paid order's ``SubsidyCaptured`` dead-lettered by two
services' consumers at once (catalog's and eligibility's runtime roles lost the privilege their
projections need, as a broken migration would leave them) is listed under both, shown by its
sequence without saying whose it is, and replayed, after the fix, by one ``replay --all``: each
handled once; again, nothing changes. (tests/e2e/test_dead_letters.py covers one service with
``--service``.)"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql

from services.kernel import bus
from subsidy.v1 import eligibility_pb2, ledger_pb2
from subsidyctl import demo
from subsidyctl.demo import IN_REGION
from subsidyctl.localstack import REPO, LocalStack
from subsidyctl.stack.certs import OPERATOR_DEMO
from subsidyctl.stack.postgres import runtime_user

T = TypeVar("T")
CAPTURED = "subsidy.v1.SubsidyCaptured"
# Whose projection a capture updates, and the table its runtime role may no longer update.
BROKEN = {"catalog": "sales_orders", "eligibility": "qualifications"}


def dlq(stack: LocalStack, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    """``subsidyctl dlq ...`` in its own process, as an operator, with no ``--service`` or
    ``--address``: only the stack's base port in the environment. Exit code, JSON lines, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    env |= {"SUBSIDY_BASE_PORT": str(stack.ports.base), "PYTHONPATH": str(REPO)}
    identity = stack.identity(OPERATOR_DEMO)
    proc = subprocess.run(
        [sys.executable, "-m", "subsidyctl", "dlq", *args, "--identity", str(identity)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, lines, proc.stderr


def eventually(check: Callable[[], T], within: float = 90.0) -> T:
    deadline = time.monotonic() + within
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


async def last_dead_letter(stack: LocalStack) -> int:
    """The dead-letter stream's last sequence."""
    assert stack.nats is not None
    nc, js = await bus.connect(stack.nats.url, "test-dlq", stack.nats.operator)
    try:
        return int((await js.stream_info(bus.DLQ_STREAM)).state.last_seq)
    finally:
        await nc.close()


def privilege(stack: LocalStack, verb: str) -> None:
    """GRANT or REVOKE the runtime roles' writes on the projections a capture updates."""
    assert stack.pg is not None
    for service, table in BROKEN.items():
        with psycopg.connect(stack.pg.conninfo(service), autocommit=True) as db:
            statement = (
                "GRANT INSERT, UPDATE ON {} TO {}"
                if verb == "GRANT"
                else ("REVOKE INSERT, UPDATE ON {} FROM {}")
            )
            db.execute(
                sql.SQL(statement).format(
                    sql.Identifier(table), sql.Identifier(runtime_user(service))
                )
            )


def status(stack: LocalStack, service: str, query: str, order: str) -> str | None:
    assert stack.pg is not None
    with psycopg.connect(stack.pg.conninfo(service)) as db:
        row = db.execute(query, (order,)).fetchone()
    return None if row is None else str(row[0])


def order_status(stack: LocalStack, order: str) -> tuple[str | None, str | None]:
    """(catalog's sales order, eligibility's qualification) status of ``order``."""
    return (
        status(stack, "catalog", "SELECT status FROM sales_orders WHERE order_id = %s", order),
        status(
            stack, "eligibility", "SELECT status FROM qualifications WHERE order_id = %s", order
        ),
    )


async def reserve(stack: LocalStack, order: str) -> None:
    client = demo.Client(stack.endpoints())
    try:
        await demo.seed(client, random.Random(7), {**demo.load_demo(), "consumers": 0})
        consumer = await demo.register(client, demo.generate_person(random.Random(order)))
        qual = await client.eligibility.ClaimQualification(
            eligibility_pb2.ClaimQualificationRequest(
                circumstances=IN_REGION,
                consumer_id=consumer.consumer_id,
                category="phone",
                channel=client.platform_id,
            )
        )
        await client.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=order,
                platform_id=client.platform_id,
                pool_id="pingshan-2025",
                consumer_id=consumer.consumer_id,
                qualification_id=qual.qualification_id,
                sku="demo-phone",
                unit_price_fen=300_000,
            )
        )
    finally:
        await client.close()


async def capture(stack: LocalStack, order: str) -> None:
    client = demo.Client(stack.endpoints())
    try:
        await client.ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref=f"pay-{order}")
        )
    finally:
        await client.close()


@pytest.mark.slow
def test_dlq_without_service_lists_shows_and_replays_every_services_letters(
    chaos_stack: LocalStack,
) -> None:
    stack = chaos_stack
    known = asyncio.run(last_dead_letter(stack))  # letters up to here are not this test's
    order = f"dlq-all-{random.randrange(10**9)}"
    asyncio.run(reserve(stack, order))

    def reserved() -> None:  # both projections have the order before their privilege goes
        assert order_status(stack, order) == ("RESERVED", "LOCKED"), order_status(stack, order)

    eventually(reserved)
    privilege(stack, "REVOKE")
    try:
        asyncio.run(capture(stack, order))

        def parked() -> None:  # read from the stream here: each CLI run is a process start
            assert asyncio.run(last_dead_letter(stack)) >= known + 2

        eventually(parked)
        code, listed, err = dlq(stack, "list")
        assert code == 0, err
        letters = [d for d in listed if d["sequence"] > known and d["event_type"] == CAPTURED]
        assert {d["service"] for d in letters} == set(BROKEN), listed
    finally:
        privilege(stack, "GRANT")  # the fix
    assert len(letters) == 2 and len({d["event_id"] for d in letters}) == 1
    assert all(d["reason"] == "ProgrammingError" and not d["handled"] for d in letters)
    assert order_status(stack, order) == ("RESERVED", "LOCKED")  # nothing handled yet

    # show: a letter is found by its sequence alone, in whichever service holds it (catalog,
    # asked first, answers NOT_FOUND for eligibility's).
    [theirs] = [d for d in letters if d["service"] == "eligibility"]
    code, [shown], err = dlq(stack, "show", str(theirs["sequence"]))
    assert code == 0, err
    assert (shown["service"], shown["event_id"]) == ("eligibility", theirs["event_id"])
    assert shown["producer"] == "ledger" and shown["correlation_id"] == order
    assert "payload" not in shown

    # replay --all, every service: each letter handled once.
    code, outcomes, err = dlq(stack, "replay", "--all", "--reason", "privileges restored")
    assert code == 0, err
    mine = {(o["service"], o["event_id"]): o["outcome"] for o in outcomes}
    assert {(d["service"], d["event_id"]): "handled" for d in letters}.items() <= mine.items()
    assert order_status(stack, order) == ("CAPTURED", "USED")

    # Again: nothing changes; every letter shows as handled.
    code, again, err = dlq(stack, "replay", "--all", "--reason", "again")
    assert code == 0, err
    assert {o["outcome"] for o in again if o["event_id"] == letters[0]["event_id"]} == {
        "already_handled"
    }
    code, after, err = dlq(stack, "list")
    assert code == 0, err
    assert all(d["handled"] for d in after if d["event_id"] == letters[0]["event_id"])
    assert order_status(stack, order) == ("CAPTURED", "USED")
