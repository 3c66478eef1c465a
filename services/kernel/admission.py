"""Admission control: each server process bounds its concurrent work and refuses the excess.

Beyond the number of calls a process can work on at once, a further call does not make
anything faster: it waits in the event loop behind the others, every call's latency grows
with the queue, and the callers' deadlines expire on work already half done. So a call beyond
the bound is refused at once, before any handler runs (no database, no NATS, no peer), with
``RESOURCE_EXHAUSTED``, ``ErrorInfo{reason: OVERLOADED}``, a ``google.rpc.RetryInfo`` and the
``grpc-retry-pushback-ms`` trailer gRPC's own retry policy honours. The calls admitted keep the
latency of a process at its capacity.

The bound is per class of method, so one class cannot starve another: ``writes`` (every
method that may change state), ``reads`` (``Get*``, ``List*``, ``Verify*``, ``Check*``) and
none at all for the health and reflection services (a probe must answer while the process is
busy, or Kubernetes restarts a pod that is only loaded). Sized by
``SUBSIDY_MAX_CONCURRENT_WRITES`` and ``SUBSIDY_MAX_CONCURRENT_READS``; 0 turns a class's
bound off. Streaming methods are not bounded here (the audit log's readers are few and
authorised one by one).

The retry delay is the recent time an admitted call of the class takes (an exponentially
weighted mean, within [10 ms, 1 s]): about when a slot frees.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf.message import Message

from . import metrics
from .errors import DomainError, ResourceExhausted
from .handler_cache import MethodWrapper
from .settings import Settings, SettingsError

log = logging.getLogger(__name__)

WRITES: Final = "writes"
READS: Final = "reads"

# Services never bounded: health must answer a loaded process, reflection is a developer's.
UNBOUNDED_SERVICES: Final = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# A method whose name starts so changes nothing (the protos name every read so).
READ_PREFIXES: Final = ("Get", "List", "Verify", "Check")

# The gRPC trailer a client's retry policy waits for before its next attempt (gRFC A6).
PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"
MIN_DELAY_S: Final = 0.01
MAX_DELAY_S: Final = 1.0
_WEIGHT: Final = 0.1  # of the newest admitted call in the mean latency


def method_class(method: str) -> str | None:
    """``writes``, ``reads``, or None for a method no bound applies to."""
    if method.startswith(UNBOUNDED_SERVICES):
        return None
    name = method.rsplit("/", 1)[-1]
    return READS if name.startswith(READ_PREFIXES) else WRITES


@dataclass(frozen=True)
class AdmissionLimits:
    """The most calls of each class one process works on at once (0: no bound)."""

    writes: int
    reads: int

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionLimits:
        """The bounds a service's settings name (SettingsError for a negative one)."""
        for name, value in (
            ("SUBSIDY_MAX_CONCURRENT_WRITES", settings.max_concurrent_writes),
            ("SUBSIDY_MAX_CONCURRENT_READS", settings.max_concurrent_reads),
        ):
            if value < 0:
                raise SettingsError(f"{name} must be 0 (no bound) or more, got {value}")
        return cls(writes=settings.max_concurrent_writes, reads=settings.max_concurrent_reads)

    def of(self, kind: str) -> int:
        """The bound of ``kind`` (``writes`` or ``reads``)."""
        found: int = getattr(self, kind)
        return found


def overloaded(kind: str, limit: int, delay_s: float) -> ResourceExhausted:
    """The refusal of a call beyond its class's bound."""
    return ResourceExhausted(
        "OVERLOADED",
        f"this server is working on its most {kind} at once ({limit}): retry the same "
        f"request in {delay_s:.3f} s, or at another replica",
        kind=kind,
    )


class _Gate:
    """The calls of one class in flight, and how long an admitted one has taken lately.

    A plain counter: the server's handlers all run on one event loop, so nothing between the
    check and the increment can interleave."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = limit
        self.in_flight = 0
        self.mean_s = MIN_DELAY_S
        self._gauge = metrics.ADMISSION_IN_FLIGHT.labels(kind)

    def try_enter(self) -> bool:
        if self.limit and self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        self._gauge.set(self.in_flight)
        return True

    def leave(self, took_s: float) -> None:
        self.in_flight -= 1
        self._gauge.set(self.in_flight)
        self.mean_s += _WEIGHT * (took_s - self.mean_s)

    def delay_s(self) -> float:
        return min(MAX_DELAY_S, max(MIN_DELAY_S, self.mean_s))


ServicerContext = Any  # grpc.aio.ServicerContext
Handler = Any  # grpc.RpcMethodHandler
StatusOf = Callable[[DomainError, Message], tuple[grpc.StatusCode, str, bytes]]
RetryInfo = Callable[[float], Message]


class AdmissionInterceptor(MethodWrapper):
    """Refuses a unary call beyond its class's bound with ``OVERLOADED`` before any handler.

    ``status_of`` (rpc.status_of) makes the status, its ErrorInfo and the ``retry_info``
    detail. The call is aborted, not answered by setting its code (as rpc._refuse does, which
    is cheaper): only an abort before any header makes a trailers-only response, and a
    client's gRPC retry policy treats a response with headers as committed and never retries
    it (tests/kernel/test_admission.py shows the retry)."""

    def __init__(
        self,
        limits: AdmissionLimits,
        status_of: StatusOf,
        retry_info: RetryInfo,
        *,
        details_key: str = "grpc-status-details-bin",
    ) -> None:
        self._gates = {kind: _Gate(kind, limits.of(kind)) for kind in (WRITES, READS)}
        self._status_of = status_of
        self._details_key = details_key
        self._retry_info = retry_info
        super().__init__()

    def in_flight(self, kind: str) -> int:
        """How many calls of ``kind`` this server is working on now."""
        return self._gates[kind].in_flight

    def wrap(self, method: str, handler: Handler) -> Handler:
        kind = method_class(method)
        if kind is None or handler.unary_unary is None or not self._gates[kind].limit:
            return handler
        assert kind is not None  # intercept_service passes the rest
        gate = self._gates[kind]
        inner = handler.unary_unary
        admitted = metrics.ADMISSIONS.labels(method, "admitted")
        refused = metrics.ADMISSIONS.labels(method, "refused")
        refusals = metrics.RPC_REFUSALS.labels(method, "OVERLOADED")

        async def admit(request: Any, context: ServicerContext) -> Any:
            if not gate.try_enter():
                delay_s = gate.delay_s()
                refused.inc()
                refusals.inc()
                # No log line per refusal: under overload there are thousands a second; the
                # counter is what to watch (and alert on).
                error = overloaded(kind, gate.limit, delay_s)
                code, message, status = self._status_of(error, self._retry_info(delay_s))
                await context.abort(
                    code,
                    message,
                    trailing_metadata=(
                        (self._details_key, status),
                        (PUSHBACK_KEY, str(max(1, round(delay_s * 1000)))),
                    ),
                )
            admitted.inc()
            started = time.perf_counter()
            try:
                return await inner(request, context)
            finally:
                gate.leave(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            admit, handler.request_deserializer, handler.response_serializer
        )
