"""Dead letters: the events a consumer parked because they failed for a reason of their own.

  subsidyctl dlq list [--service S] [--consumer C]        one JSON object per dead letter
  subsidyctl dlq show SEQUENCE [--service S]              one dead letter's envelope metadata
  subsidyctl dlq replay (SEQUENCE | --all) --reason TEXT [--service S] [--consumer C]

Each service answers for its own consumers' letters (OutboxService, operators only), so the
command asks every service unless ``--service`` names one. A letter shows its event's id, type,
stream, producer and times, the consumer, why it failed (the error's class) and whether the
consumer has handled it since; never the payload.

``replay`` hands the letters to their consumer again once the cause is fixed: each is handled
at most once (the consumer's record of handled events), and each one handled now is recorded as
a ``DeadLetterReplayed`` event with the operator and the reason. Replaying again changes nothing
(outcome ``already_handled``); a letter whose cause is not fixed stays (``still_failing``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf.timestamp_pb2 import Timestamp

from services.kernel import rpc, tls, topology
from subsidy.v1 import outbox_pb2, outbox_pb2_grpc

from ..stack.certs import OPERATOR_DEMO
from .common import Failure, JsonOpt, OperatorIdentityOpt, emit, identity, local_address

T = TypeVar("T")
PANEL = "Dead letters"
app = typer.Typer(
    name="dlq",
    help="Dead letters: list them, show one, replay them once the cause is fixed.",
    no_args_is_help=True,
)
ServiceOpt = Annotated[
    str,
    typer.Option(
        help=f"one service ({', '.join(topology.SERVICE_NAMES)}); default: every one",
        show_default=False,
    ),
]
AddressOpt = Annotated[
    str,
    typer.Option(help="the --service's HOST:PORT (default: the local stack's)", show_default=False),
]
ConsumerOpt = Annotated[str, typer.Option(help="one durable consumer", show_default=False)]


def _services(service: str, address: str) -> list[tuple[str, str]]:
    if service and service not in topology.SERVICE_NAMES:
        raise Failure(f"--service: one of {', '.join(topology.SERVICE_NAMES)}")
    if address and not service:
        raise Failure("--address needs --service")
    names = [service] if service else list(topology.SERVICE_NAMES)
    return [(s, address or local_address(s)) for s in names]


def _each(
    targets: Sequence[tuple[str, str]],
    who: tls.CertificateSource,
    call: Callable[[outbox_pb2_grpc.OutboxServiceAsyncStub], Awaitable[T]],
) -> list[tuple[str, T]]:
    """``call`` against each service's OutboxService in turn; a failure propagates (cli.main
    prints it)."""

    async def go() -> list[tuple[str, T]]:
        out = []
        for service, address in targets:
            channel = rpc.channel(address, who, deadline_s=30)
            try:
                out.append((service, await call(outbox_pb2_grpc.OutboxServiceStub(channel))))
            finally:
                await channel.close()
        return out

    return asyncio.run(go())


def _when(stamp: Timestamp) -> str:
    return stamp.ToDatetime().isoformat() + "Z" if stamp.seconds or stamp.nanos else ""


def letter(service: str, dl: outbox_pb2.DeadLetter, *, full: bool = False) -> dict[str, Any]:
    """A dead letter as ``list`` (or, ``full``, ``show``) prints it: metadata, never payload."""
    out: dict[str, Any] = {
        "service": service,
        "sequence": dl.sequence,
        "event_id": dl.event_id,
        "event_type": dl.event_type,
        "consumer": dl.consumer,
        "reason": dl.reason,
        "dead_lettered_at": _when(dl.dead_lettered_at),
        "handled": dl.handled,
    }
    if full:
        out |= {
            "original_subject": dl.original_subject,
            "stream_id": dl.stream_id,
            "stream_version": dl.stream_version,
            "producer": dl.producer,
            "occurred_at": _when(dl.occurred_at),
            "correlation_id": dl.correlation_id,
            "causation_id": dl.causation_id,
        }
    return out


def _owner(
    targets: Sequence[tuple[str, str]], who: tls.CertificateSource, sequence: int
) -> tuple[str, str, outbox_pb2.DeadLetter]:
    """The service whose consumer the letter ``sequence`` is (each other answers NOT_FOUND)."""
    for service, address in targets:
        try:
            [(_, dl)] = _each(
                [(service, address)],
                who,
                lambda stub: stub.GetDeadLetter(outbox_pb2.GetDeadLetterRequest(sequence=sequence)),
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                continue
            raise
        return service, address, dl
    raise Failure(f"no dead letter {sequence} in the dead-letter stream of these services")


@app.command("list", rich_help_panel=PANEL)
def list_letters(
    service: ServiceOpt = "",
    address: AddressOpt = "",
    consumer: ConsumerOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Every dead letter (event id, type, consumer, reason, when, handled since), oldest first."""
    who = identity(identity_dir, OPERATOR_DEMO)
    if consumer and not service:
        raise Failure("--consumer needs --service")

    async def page(stub: outbox_pb2_grpc.OutboxServiceAsyncStub) -> list[outbox_pb2.DeadLetter]:
        letters: list[outbox_pb2.DeadLetter] = []
        after = 0
        while True:
            request = outbox_pb2.ListDeadLettersRequest(
                consumer=consumer, after_sequence=after, limit=1000
            )
            got = list((await stub.ListDeadLetters(request)).dead_letters)
            if not got:
                return letters
            letters += got
            after = got[-1].sequence

    for name, letters in _each(_services(service, address), who, page):
        for dl in letters:
            emit(letter(name, dl))


@app.command("show", rich_help_panel=PANEL)
def show(
    sequence: Annotated[int, typer.Argument(help="the dead letter's sequence", min=1)],
    service: ServiceOpt = "",
    address: AddressOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """One dead letter: its envelope's metadata (no payload), the consumer and the reason."""
    who = identity(identity_dir, OPERATOR_DEMO)
    name, _, dl = _owner(_services(service, address), who, sequence)
    emit(letter(name, dl, full=True))


@app.command("replay", rich_help_panel=PANEL)
def replay(
    reason: Annotated[str, typer.Option(help="what was fixed; kept with the event")],
    sequence: Annotated[
        int, typer.Argument(help="one dead letter's sequence (or --all)", min=0)
    ] = 0,
    all_letters: Annotated[bool, typer.Option("--all", help="every dead letter")] = False,
    service: ServiceOpt = "",
    address: AddressOpt = "",
    consumer: ConsumerOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Hand dead letters to their consumer again after the cause is fixed; once each."""
    if bool(sequence) == all_letters:
        raise Failure("give exactly one of SEQUENCE or --all")
    if consumer and not service:
        raise Failure("--consumer needs --service")
    who = identity(identity_dir, OPERATOR_DEMO)
    targets = _services(service, address)
    if sequence:
        name, addr, _ = _owner(targets, who, sequence)
        targets = [(name, addr)]
    request = outbox_pb2.ReplayDeadLettersRequest(
        sequence=sequence, all=all_letters, consumer=consumer, reason=reason
    )
    for name, answer in _each(targets, who, lambda stub: stub.ReplayDeadLetters(request)):
        for o in answer.outcomes:
            emit(
                {
                    "service": name,
                    "sequence": o.sequence,
                    "event_id": o.event_id,
                    "consumer": o.consumer,
                    "outcome": o.outcome,
                    "error": o.error,
                }
            )
