"""The fuzzer: every RPC of every service, enumerated from the descriptors, fed generated and
mutated requests over real mutual TLS, with every outcome checked.

For each RPC the servers serve (``Running.wiring.service_names`` and the outbox, as the servers
register them, so a new RPC is fuzzed without editing anything here) the engine

- generates requests from the request message's descriptor (``tests/fuzz/strategies.py``,
  hypothesis, seeded) and damages the bytes of some of them (:func:`strategies.mutate`);
- sends each as raw bytes (no client serializer, so undecodable bytes reach the server) as a
  caller the authorisation table allows (``services/kernel/authz.py``), so the request reaches
  validation, and a few as a caller of a role the table refuses;
- checks each answer: never ``INTERNAL``, ``UNKNOWN`` or ``DATA_LOSS``; a wrong role always
  ``PERMISSION_DENIED``, whatever its bytes; every refusal carries an ``ErrorInfo`` reason;
- checks that a refused request changed no state: each service's row count of every table
  (its events included) is read before and after every request; equal after a refusal; after a
  success the platform is left to settle (consumers, audit) and counted again;
- after each RPC's batch, checks that every service still runs and answers health SERVING.

A run is replayable from its seed: each RPC's requests are drawn from ``seed`` and the RPC's
name only, so ``SUBSIDY_FUZZ_SEED=<seed> SUBSIDY_FUZZ_ONLY=<Method>`` regenerates one RPC's.
"""

from __future__ import annotations

import asyncio
import collections
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from sqlalchemy import text

from services.kernel import authz, eventlog, rpc, tls
from services.kernel.identity import Caller, Role
from subsidy.v1 import outbox_pb2
from tests.fuzz import strategies

OUTBOX = outbox_pb2.DESCRIPTOR.services_by_name["OutboxService"].full_name
# Never acceptable, whatever was sent: the server did not know what to make of its own state.
BAD = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})
# The names callers of each role present (the test PKI issues them; a platform sees its own).
NAMES: dict[Role, tuple[str, ...]] = {
    Role.PLATFORM: ("jd", "taobao"),
    Role.OPERATOR: ("ops", "ops2"),
    Role.APPROVER: ("checker",),
    Role.AUDITOR: ("audit",),
    Role.SERVICE: ("ledger", "eligibility"),
}
WRONG_ROLE_SHARE = 0.05  # of each RPC's requests, sent by a role the table refuses
MUTATED_SHARE = 0.25  # of each RPC's requests, valid bytes damaged
DEADLINE_S = 15.0


@dataclass(frozen=True)
class Target:
    """One RPC of one running service."""

    process: str
    address: str
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"


@dataclass
class Finding:
    """A request whose answer broke a rule; ``index`` is its place in the RPC's sequence."""

    path: str
    index: int
    rule: str
    detail: str
    request_hex: str


@dataclass
class Report:
    """What a run sent and got back."""

    seed: int
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    codes_by_service: dict[str, collections.Counter[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    state_checks: int = 0
    client_races: int = 0  # INTERNAL made by the client library, not the server (see send)

    def record(self, target: Target, code: grpc.StatusCode) -> None:
        self.requests[target.process] += 1
        self.codes[code.name] += 1
        self.codes_by_service.setdefault(target.process, collections.Counter())[code.name] += 1

    def summary(self) -> str:
        """The run in a few lines: the seed, requests per service, answers by status code."""
        lines = [f"fuzz seed {self.seed}: {sum(self.requests.values())} requests"]
        for process in sorted(self.requests):
            codes = ", ".join(f"{c} {n}" for c, n in self.codes_by_service[process].most_common())
            lines.append(f"  {process}: {self.requests[process]} requests ({codes})")
        lines.append(
            f"  state compared {self.state_checks} times; {len(self.findings)} findings;"
            f" {self.client_races} client-side write races (counted as INTERNAL above)"
        )
        lines += [
            f"  FINDING {f.path} #{f.index}: {f.rule}: {f.detail} (request {f.request_hex})"
            for f in self.findings[:50]
        ]
        return "\n".join(lines)


def targets(running: dict[str, Any]) -> list[Target]:
    """Every RPC of every service each running server serves, from the descriptors."""
    pool = descriptor_pool.Default()
    found = []
    for process, r in sorted(running.items()):
        names = dict.fromkeys([*r.wiring.service_names, eventlog.SERVICE_NAME, OUTBOX])
        for full_name in names:
            for m in pool.FindServiceByName(full_name).methods:
                found.append(Target(process, f"127.0.0.1:{r.port}", m))
    return found


def rpc_seed(seed: int, path: str) -> int:
    """The seed of one RPC's requests: the run's seed and the RPC's name, nothing else."""
    return zlib.crc32(f"{seed}:{path}".encode())


def generate(target: Target, count: int, seed: int, known: Sequence[str]) -> list[bytes]:
    """``count`` requests for ``target``: generated from its request descriptor (hypothesis,
    seeded), a share of them damaged on the wire."""
    generated: list[Message] = []
    strategy = strategies.message(target.method.input_type, known)

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(request: Message) -> None:
        generated.append(request)

    collect()
    rng = random.Random(seed)
    out = [m.SerializeToString() for m in generated]
    while out and len(out) < count:  # hypothesis may stop early on a small message
        out.append(rng.choice(out))
    return [strategies.mutate(b, rng) if rng.random() < MUTATED_SHARE else b for b in out]


def allowed_callers(path: str) -> list[Caller]:
    """The callers the authorisation table lets call ``path``."""
    callers = []
    for principal in sorted(authz.RULES[path]):
        role, _, name = principal.partition("/")
        for n in (name,) if name else NAMES[Role(role)]:
            callers.append(Caller(Role(role), n))
    return callers


def refused_callers(path: str) -> list[Caller]:
    """Callers of every role the table refuses for ``path``."""
    return [
        Caller(role, names[0])
        for role, names in NAMES.items()
        if not authz.allowed(path, Caller(role, names[0]))
    ]


# What grpc-python's aio client makes the status of a call whose request write failed because
# the server had already answered (``_call.py``: ``set_internal_error``): the client library's
# own INTERNAL, which replaces the server's answer; never anything the server sent.
CLIENT_WRITE_RACE = "Internal error from Core"


async def send(
    channel: grpc.aio.Channel, m: MethodDescriptor, data: bytes
) -> tuple[grpc.StatusCode, grpc.aio.AioRpcError | None]:
    """Send ``data`` as ``m``'s request, raw; the answer's code (and error, if refused)."""
    path = f"/{m.containing_service.full_name}/{m.name}"
    kind = f"{'stream' if m.client_streaming else 'unary'}_" + (
        "stream" if m.server_streaming else "unary"
    )
    multi = getattr(channel, kind)(path)  # no serializers: the bytes go as they are
    if m.client_streaming:
        return await _send_stream(multi(timeout=DEADLINE_S), m, data)
    try:
        if m.server_streaming:
            async for _ in multi(data, timeout=DEADLINE_S):
                pass
        else:
            await multi(data, timeout=DEADLINE_S)
    except grpc.aio.AioRpcError as err:
        return err.code(), err
    return grpc.StatusCode.OK, None


async def _send_stream(
    call: Any, m: MethodDescriptor, data: bytes
) -> tuple[grpc.StatusCode, grpc.aio.AioRpcError | None]:
    """A client stream: the request, then (after the server's first answer, as the bill's
    protocol asks: READY before data) the same bytes again as a second message."""
    try:
        await call.write(data)
        if m.server_streaming:
            if await call.read() is not grpc.aio.EOF:
                await call.write(data)
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
        else:
            await call.write(data)
            await call.done_writing()
            await call
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the call's status says what happened
    code = await call.code()
    if code == grpc.StatusCode.OK:
        return code, None
    return code, grpc.aio.AioRpcError(
        code, await call.initial_metadata(), await call.trailing_metadata(), await call.details()
    )


class State:
    """Row counts of every table of every service's database (its events table included)."""

    def __init__(self, running: dict[str, Any], clock_driven: frozenset[str] = frozenset()) -> None:
        self._running = running
        self._clock_driven = clock_driven  # "service.table"s that grow on a timer, not a call
        self._queries: dict[str, Any] = {}

    async def _query(self, process: str) -> Any:
        if process not in self._queries:
            engine = self._running[process].runtime.store.engine
            async with engine.connect() as conn:
                tables = sorted(
                    t
                    for (t,) in await conn.execute(
                        text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                    )
                    if f"{process}.{t}" not in self._clock_driven
                )
            columns = ", ".join(f'(SELECT count(*) FROM "{t}") AS "{t}"' for t in tables)
            self._queries[process] = text(f"SELECT {columns}")  # names from the catalog
        return self._queries[process]

    async def counts(self) -> dict[str, dict[str, int]]:
        """{service: {table: rows}} now."""
        out: dict[str, dict[str, int]] = {}
        for process, r in sorted(self._running.items()):
            query = await self._query(process)
            async with r.runtime.store.engine.connect() as conn:
                row = (await conn.execute(query)).mappings().one()
            out[process] = {k: int(v) for k, v in row.items()}
        return out


def changed(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> list[str]:
    """The tables whose row counts differ, as ``service.table before->after``."""
    return [
        f"{p}.{t} {before[p].get(t)}->{after[p].get(t)}"
        for p in sorted(after)
        for t in sorted(set(before.get(p, {})) | set(after[p]))
        if before.get(p, {}).get(t) != after[p].get(t)
    ]


class Fuzzer:
    """Runs the requests and checks every rule (see the module docstring)."""

    def __init__(
        self,
        running: dict[str, Any],
        identities: Callable[[Caller], tls.CertificateSource],
        settle: Callable[[], Any],
        known: Sequence[str],
        seed: int,
        clock_driven: frozenset[str] = frozenset(),
    ) -> None:
        self.running = running
        self.identities = identities
        self.settle = settle  # waits until every consumer has handled every event
        self.known = known
        self.report = Report(seed)
        self.state = State(running, clock_driven)
        self._channels: dict[tuple[str, Caller], grpc.aio.Channel] = {}

    def channel(self, address: str, who: Caller) -> grpc.aio.Channel:
        key = (address, who)
        if key not in self._channels:
            self._channels[key] = rpc.channel(address, self.identities(who), deadline_s=DEADLINE_S)
        return self._channels[key]

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def run(self, every: Sequence[Target], per_service: int) -> Report:
        """``per_service`` requests for each service, shared evenly among its RPCs."""
        by_process = collections.Counter(t.process for t in every)
        await self.settle()
        before = await self.state.counts()
        for target in every:
            count = -(-per_service // by_process[target.process])  # rounded up
            before = await self.batch(target, count, before)
            await self.check_alive(target)
        return self.report

    async def batch(
        self, target: Target, count: int, before: dict[str, dict[str, int]]
    ) -> dict[str, dict[str, int]]:
        """Send ``count`` requests to ``target``; returns the state counted after the last."""
        seed = rpc_seed(self.report.seed, target.path)
        rng = random.Random(seed ^ 0x5EED)
        allowed = allowed_callers(target.path)
        refused = refused_callers(target.path)
        for index, data in enumerate(generate(target, count, seed, self.known)):
            wrong = bool(refused) and rng.random() < WRONG_ROLE_SHARE
            who = rng.choice(refused if wrong else allowed)
            code, err = await send(self.channel(target.address, who), target.method, data)
            self.report.record(target, code)

            def finding(rule: str, detail: str, index: int = index, data: bytes = data) -> None:
                self.report.findings.append(
                    Finding(target.path, index, rule, detail, data[:48].hex())
                )

            raced = (
                target.method.client_streaming
                and err is not None
                and code == grpc.StatusCode.INTERNAL
                and err.details() == CLIENT_WRITE_RACE
            )
            if raced:
                self.report.client_races += 1
            elif code in BAD:
                finding(code.name, (err.details() if err else "") or "")
            # Authorisation runs before decoding and validation: a caller the table refuses
            # learns nothing about the method's message, not even that its bytes are wrong.
            # Only a request over the server's size limit is refused before that, by gRPC's
            # transport (RESOURCE_EXHAUSTED: nothing of the method ran for anybody).
            oversized = len(data) > rpc.MAX_REQUEST_BYTES
            if wrong and not raced and code != grpc.StatusCode.PERMISSION_DENIED:
                if not (oversized and code == grpc.StatusCode.RESOURCE_EXHAUSTED):
                    finding("WRONG_ROLE_NOT_REFUSED", f"{who} got {code.name}")
            if err is not None and not raced and code not in BAD and rpc.error_info(err) is None:
                if not (oversized and code == grpc.StatusCode.RESOURCE_EXHAUSTED):
                    finding("NO_REASON", f"{code.name} without ErrorInfo: {err.details()}")
            if code == grpc.StatusCode.OK:
                # A success may change state; one that appended nothing (a read) leaves
                # nothing in flight, so only a writing one needs the platform to settle.
                after = await self.state.counts()
                if after != before:
                    await self.settle()
                    after = await self.state.counts()
                before = after
                continue
            after = await self.state.counts()
            self.report.state_checks += 1
            if after != before:
                # A success's late effects could still be arriving: settle and look again.
                await self.settle()
                after = await self.state.counts()
                if after != before:
                    finding("REFUSAL_CHANGED_STATE", f"{code.name}: {changed(before, after)}")
            before = after
        return before

    async def check_alive(self, target: Target) -> None:
        """Every service still runs and answers health SERVING."""
        for process, r in sorted(self.running.items()):
            if r.done.done():
                self.report.findings.append(Finding(target.path, -1, "PROCESS_ENDED", process, ""))
                continue
            health = health_pb2_grpc.HealthStub(
                self.channel(f"127.0.0.1:{r.port}", Caller(Role.AUDITOR, "audit"))
            )
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            if answer.status != health_pb2.HealthCheckResponse.SERVING:
                self.report.findings.append(
                    Finding(target.path, -1, "NOT_SERVING", f"{process}: {answer.status}", "")
                )
