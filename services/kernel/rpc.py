"""The one gRPC bootstrap every service uses: server, client channels, interceptors.

Server: mutual TLS only, grpc.health.v1, server reflection (unless turned off), OpenTelemetry
server spans, the authorisation table (services/kernel/authz.py) enforced before any handler,
and the error mapping
(a :class:`DomainError` becomes its status code with a ``google.rpc.ErrorInfo`` detail naming
the reason and the field; a :class:`WrongExpectedVersion` becomes ``ABORTED`` with reason
``CONCURRENT_UPDATE``, retryable; anything else becomes ``INTERNAL`` with no internals leaked).
Client: mutual TLS with a renewing certificate, OpenTelemetry client spans and a default
deadline on every call.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeAlias, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor

from . import admission, authz, faults, metrics, ratelimit, tls
from .errors import (
    ERROR_DOMAIN,
    DomainError,
    InvalidArgument,
    Unavailable,
    WrongExpectedVersion,
    concurrent_update,
)
from .handler_cache import MethodWrapper

log = logging.getLogger(__name__)
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Set deliberately: the largest request is a product import (a CSV of at most 3 MiB, see
# services/catalog/importer.py); every other field is bounded at the edge, and whatever a
# request makes the store record is refused at append if the event bus would refuse it
# (services.kernel.events.MAX_ENVELOPE_BYTES), so no input can wedge a service's outbox.
MAX_REQUEST_BYTES = 4 * 1024 * 1024

Registration = tuple[Callable[[Any, grpc.aio.Server], None], Any]
ServicerContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def status_of(error: DomainError, *extra: Message) -> tuple[grpc.StatusCode, str, bytes]:
    """The status code, message and serialized google.rpc.Status for a domain error: its
    ErrorInfo, then any ``extra`` details (a RetryInfo)."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    details = []
    for message in (info, *extra):
        detail = any_pb2.Any()
        detail.Pack(message)
        details.append(detail)
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name), message=error.message, details=details
    )
    return error.code, error.message, status.SerializeToString()


class ErrorMappingInterceptor(MethodWrapper):
    """Turns domain errors into precise statuses; never lets bad input become INTERNAL.

    A failure that is an outage of a part the service needs (its database, NATS, Vault:
    services.kernel.faults.transient_part) is ``UNAVAILABLE`` with reason
    ``<PART>_UNAVAILABLE`` and a ``google.rpc.RetryInfo``, as is a peer's unavailability;
    ``on_outage`` is told the part (the health watch probes it at once)."""

    def __init__(self, on_outage: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.on_outage = on_outage

    async def _outage(self, method: str, part: str, context: Any) -> None:
        """Answer a call that met ``part`` down: UNAVAILABLE with a retry delay. One line, no
        traceback (there may be thousands), and the health watch probes at once."""
        outage = faults.unavailable(part)
        metrics.RPC_REFUSALS.labels(method, outage.reason).inc()
        log.warning("%s refused: the %s is down", method, part)
        if self.on_outage is not None:
            self.on_outage(part)
        await _abort(context, outage, ratelimit.retry_info(faults.RETRY_DELAY_S))

    def wrap(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is None:
            return self._mapped_stream(method, handler)
        inner = handler.unary_unary

        async def mapped(request: Any, context: ServicerContext) -> Any:
            started = time.perf_counter()
            outcome = "OK"
            try:
                return await inner(request, context)  # type: ignore[arg-type]
            except (DomainError, WrongExpectedVersion) as exc:
                # A version conflict that reached here lost a race with another writer: the
                # caller may retry (ABORTED), it is not a server fault (INTERNAL).
                err = exc if isinstance(exc, DomainError) else concurrent_update()
                outcome = err.code.name
                metrics.RPC_REFUSALS.labels(method, err.reason).inc()
                if err.code == grpc.StatusCode.UNAVAILABLE:
                    # Aborted, not answered by _refuse: only a response without headers is one
                    # a client's gRPC retry policy may retry (services/kernel/admission.py).
                    await _abort(context, err, ratelimit.retry_info(faults.RETRY_DELAY_S))
                else:
                    _refuse(context, err)
                return None
            except grpc.aio.AbortError:
                outcome = "ABORTED"
                raise
            except NotImplementedError:
                # A generated servicer's default for a method it does not implement (e.g. the
                # health service's List): the method is not there, the server did not fail.
                outcome = "UNIMPLEMENTED"
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
            except Exception as exc:
                part = faults.transient_part(exc)
                if part is not None:
                    # A part is down, not the server broken: the caller retries.
                    outcome = "UNAVAILABLE"
                    await self._outage(method, part, context)
                if faults.is_conflict(exc):
                    # The database's serialization failure or deadlock: nothing was written.
                    outcome = "ABORTED"
                    _refuse(context, concurrent_update())
                    return None
                outcome = "INTERNAL"
                log.exception("unhandled error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the trace")
            finally:
                metrics.RPC_LATENCY.labels(method, outcome).observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            mapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _mapped_stream(self, method: str, handler: Handler) -> Handler:
        """A streaming method: its servicer maps its own refusals (it must, to refuse after
        it has answered part of a stream); only an outage is mapped here, to UNAVAILABLE."""
        decode, encode = handler.request_deserializer, handler.response_serializer

        async def outage_or_raise(exc: Exception, context: Any) -> None:
            part = faults.transient_part(exc)
            if part is None:
                raise exc
            await self._outage(method, part, context)

        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> Any:
                try:
                    async for item in authz._iterate(inner_us(request, context)):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await outage_or_raise(exc, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, decode, encode)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: Any) -> Any:
                try:
                    return await inner_su(requests, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await outage_or_raise(exc, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, decode, encode)
        inner_ss = handler.stream_stream
        assert inner_ss is not None  # the fourth shape

        async def stream_stream(requests: Any, context: Any) -> Any:
            try:
                async for item in authz._iterate(inner_ss(requests, context)):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await outage_or_raise(exc, context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, decode, encode)


def _refuse(context: ServicerContext, error: DomainError, *extra: Message) -> None:
    """Answer a refusal as :func:`_abort` does (code, message, ErrorInfo), without raising:
    the OpenTelemetry interceptor records a raised ``AbortError`` as a span exception and
    formats its whole traceback: an eighth of eligibility's CPU under the claim rush, where
    most claims are refused (docs/benchmarks.md). The span still gets the status code; the
    handler returns nothing, and gRPC sends no message with a status that is not OK."""
    code, message, status = status_of(error, *extra)
    context.set_code(code)
    context.set_details(message)
    context.set_trailing_metadata(((STATUS_DETAILS_KEY, status),))


async def _abort(context: ServicerContext, error: DomainError, *extra: Message) -> None:
    code, message, status = status_of(error, *extra)
    await context.abort(code, message, trailing_metadata=((STATUS_DETAILS_KEY, status),))


class _Malformed:
    """What the tolerant deserializer hands on in place of a request it could not decode."""

    __slots__ = ()


_MALFORMED = _Malformed()


def malformed_request(method: str) -> InvalidArgument:
    """The refusal of request bytes that are not the method's request message."""
    return InvalidArgument(
        "MALFORMED_REQUEST",
        f"the request bytes are not a valid {method.rsplit('/', 1)[-1]} request message",
    )


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserialize`` that answers :data:`_MALFORMED` instead of raising: gRPC decodes the
    request before any interceptor's code runs, and a decoder's exception there becomes
    ``UNKNOWN`` with its class in the message and a traceback at ERROR."""

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # whatever the caller's bytes make the decoder raise
            return _MALFORMED

    return decode


class DecodeGuardInterceptor(MethodWrapper):
    """Request bytes that do not decode answer ``INVALID_ARGUMENT`` (reason
    ``MALFORMED_REQUEST``) with one log line, on every shape of call. The innermost
    interceptor: the ones outside copy its request deserializer, so authorisation still runs
    first and an unknown caller learns nothing about the method's message."""

    def wrap(self, method: str, handler: Handler) -> Handler:
        if handler.request_deserializer is None:
            return handler
        decode = _tolerant(handler.request_deserializer)
        encode = handler.response_serializer
        error = malformed_request(method)

        def refused() -> None:
            metrics.RPC_REFUSALS.labels(method, error.reason).inc()
            log.info("refused %s: the request bytes do not decode", method)

        async def checked(requests: Any) -> Any:
            async for request in requests:
                if request is _MALFORMED:
                    refused()
                    raise error
                yield request

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                if request is _MALFORMED:
                    refused()
                    _refuse(context, error)
                    return None
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, decode, encode)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> Any:
                if request is _MALFORMED:
                    refused()
                    await _abort(context, error)
                async for item in authz._iterate(inner_us(request, context)):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, decode, encode)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: Any) -> Any:
                try:
                    return await inner_su(checked(requests), context)
                except InvalidArgument as exc:
                    await _abort(context, exc)

            return grpc.stream_unary_rpc_method_handler(stream_unary, decode, encode)
        inner_ss = handler.stream_stream
        assert inner_ss is not None  # the fourth shape

        async def stream_stream(requests: Any, context: Any) -> Any:
            try:
                async for item in authz._iterate(inner_ss(checked(requests), context)):
                    yield item
            except InvalidArgument as exc:
                await _abort(context, exc)

        return grpc.stream_stream_rpc_method_handler(stream_stream, decode, encode)


class AuthorizationInterceptor(MethodWrapper):
    """Before any handler runs: who calls (from the client certificate the TLS handshake
    verified) and whether the authorisation table lets them call this method. A method the
    table does not name is refused, for every caller. (``rules`` is the table; only a test
    server with test methods passes another.)"""

    def __init__(self, rules: Mapping[str, frozenset[str]] = authz.RULES) -> None:
        super().__init__()
        self._rules = rules

    def wrap(self, method: str, handler: Handler) -> Handler:
        async def reject(context: ServicerContext, error: DomainError) -> None:
            metrics.RPC_REFUSALS.labels(method, error.reason).inc()
            log.warning("refused %s: %s", method, error.reason)
            await _abort(context, error)

        guarded: Handler = authz.guard(method, handler, reject, self._rules)
        return guarded


class FusedChain(MethodWrapper):
    """Several server interceptors as one: the handler they make together, built once per
    method (:class:`MethodWrapper`), instead of gRPC awaiting each one's ``intercept_service``
    at every call. ``chain`` is outermost first, as gRPC's ``interceptors=`` list; the wrapped
    handler is exactly what the same interceptors chained by gRPC would answer, and the steps
    at call time run in the same order."""

    def __init__(self, chain: Sequence[MethodWrapper]) -> None:
        super().__init__()
        self._innermost_first = tuple(reversed(chain))

    def wrap(self, method: str, handler: Handler) -> Handler:
        for interceptor in self._innermost_first:  # as gRPC's chain unwinds
            handler = interceptor.wrap(method, handler)
        return handler


def build_server(
    registrations: Sequence[Registration],
    service_names: Sequence[str],
    *,
    reflection_on: bool = True,
    rules: Mapping[str, frozenset[str]] = authz.RULES,
    rate_limits: ratelimit.RateLimits | None = None,
    on_outage: Callable[[str], None] | None = None,
    admission_limits: admission.AdmissionLimits | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, grpc_health.aio.HealthServicer]:
    """A server with health, reflection (unless turned off), tracing, authorisation, the
    per-process admission bound (when given; every service's is: services/kernel/admission.py),
    the per-client rate limits (when given; every service's are), error mapping (``on_outage``
    is told of each call that met a part down) and malformed requests refused; ``reuse_port``
    lets several processes listen on one port; not yet listening (see :func:`listen`)."""
    limiting = [] if rate_limits is None else [ratelimit.RateLimitInterceptor(rate_limits, _abort)]
    admitting = (
        []  # no bound set (the default): nothing in the calls' way
        if admission_limits is None or not (admission_limits.writes or admission_limits.reads)
        else [
            admission.AdmissionInterceptor(
                admission_limits,
                status_of,
                ratelimit.retry_info,
                details_key=STATUS_DETAILS_KEY,
            )
        ]
    )
    chain = FusedChain(
        [
            AuthorizationInterceptor(rules),
            # After authorisation (cheap, in memory) so every call is still authorised first;
            # before everything that may do work.
            *admitting,
            *limiting,  # after authorisation: a bucket is the authenticated caller's
            ErrorMappingInterceptor(on_outage),
            DecodeGuardInterceptor(),  # innermost: see its docstring
        ]
    )
    server = grpc.aio.server(
        # OpenTelemetry's stays a separate, outermost interceptor: it works per call (a span).
        interceptors=[aio_server_interceptor(), chain],  # type: ignore[no-untyped-call]
        options=[
            # Off unless several workers share the port (services/kernel/workers.py): a second
            # process on a port in use must fail, not silently take half the calls.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
        ],
    )
    for add, servicer in registrations:
        add(servicer, server)
    health = grpc_health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if reflection_on:
        reflection.enable_server_reflection(
            (
                *service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
    return server, health


def listen(server: grpc.aio.Server, address: str, identity: tls.CertificateSource) -> int:
    """Listen on ``address`` with mutual TLS only (there is no plaintext port); returns the
    port. A renewed certificate is served from the next handshake on."""
    return server.add_secure_port(address, tls.server_credentials(identity))


async def set_serving(health: grpc_health.aio.HealthServicer, names: Sequence[str]) -> None:
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def set_not_serving(health: grpc_health.aio.HealthServicer, names: Sequence[str]) -> None:
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


class DeadlineInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Every outgoing call gets a deadline, so one stuck peer cannot hang a checkout."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        if details.timeout is None:
            details = grpc.aio.ClientCallDetails(
                details.method,
                self._seconds,
                details.metadata,
                details.credentials,
                details.wait_for_ready,
            )
        return await continuation(details, request)


# The calls one service makes of another that may be sent again as they are: a read
# (VerifyItem, GetPolicy, the identity check) or a command the callee makes idempotent
# (LockQualification of the same order is answered as the first was). Only these are retried.
IDEMPOTENT_INTERNAL_CALLS: tuple[tuple[str, str], ...] = (
    ("subsidy.v1.CatalogService", "VerifyItem"),
    ("subsidy.v1.CatalogService", "GetPolicy"),
    ("subsidy.v1.EligibilityService", "LockQualification"),
    ("subsidy.v1.IdentityAuthority", "VerifyThreeFactors"),
)
# gRPC's own retry policy (gRFC A6): a peer that is briefly down (UNAVAILABLE) or refuses
# beyond its admission bound (RESOURCE_EXHAUSTED, reason OVERLOADED, with the
# grpc-retry-pushback-ms trailer that sets the next attempt's delay) is tried again, at most
# 4 attempts in all, with jittered exponential backoff, within the call's one deadline.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}


def service_config(
    methods: Sequence[tuple[str, str]] = IDEMPOTENT_INTERNAL_CALLS,
) -> str:
    """The gRPC service config (JSON) that retries ``methods`` by :data:`RETRY_POLICY`."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": svc, "method": name} for svc, name in methods],
                    "retryPolicy": RETRY_POLICY,
                }
            ]
        }
    )


def channel(
    addr: str,
    identity: tls.CertificateSource,
    *,
    deadline_s: float = 5.0,
    retry: Sequence[tuple[str, str]] = (),
) -> tls.RenewingChannel:
    """A mutual-TLS client channel presenting ``identity``'s current certificate, with tracing
    and a default deadline on every call; the ``retry`` methods (service, method) are retried
    by :data:`RETRY_POLICY` (a service's channels to its peers retry
    :data:`IDEMPOTENT_INTERNAL_CALLS`)."""
    options: list[tuple[str, Any]] = []
    if retry:
        options = [("grpc.enable_retries", 1), ("grpc.service_config", service_config(retry))]
    return tls.RenewingChannel(
        addr,
        identity,
        interceptors=[*aio_client_interceptors(), DeadlineInterceptor(deadline_s)],  # type: ignore[no-untyped-call]
        options=options,
    )


K = TypeVar("K", bound=Hashable)


class RoutedChannel(grpc.aio.Channel, Generic[K]):
    """A client channel to one server for a client that acts as several identities (the demo
    runs a platform, an operator and an approver; tests act as many): per call, ``choose``
    picks an identity key from the method and the request, and the call goes over that
    identity's own mutual-TLS channel (opened once, with ``identity_of(key)``'s certificate).
    Streaming-request calls choose from the method alone (``request`` is None)."""

    def __init__(
        self,
        target: str,
        identity_of: Callable[[K], tls.CertificateSource],
        choose: Callable[[str, Any], K],
        default: K,
        *,
        deadline_s: float = 10.0,
    ) -> None:
        self.target = target
        self._identity_of = identity_of
        self._choose = choose
        self._default = default
        self._deadline_s = deadline_s
        self._channels: dict[K, tls.RenewingChannel] = {}

    def channel_of(self, key: K) -> tls.RenewingChannel:
        if key not in self._channels:
            self._channels[key] = channel(
                self.target, self._identity_of(key), deadline_s=self._deadline_s
            )
        return self._channels[key]

    def _route(self, kind: str, method: str, *args: Any, **kwargs: Any) -> Any:
        def call(request: Any, *call_args: Any, **call_kwargs: Any) -> Any:
            multi = getattr(self.channel_of(self._choose(method, request)), kind)
            return multi(method, *args, **kwargs)(request, *call_args, **call_kwargs)

        return call

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._route("unary_unary", method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._route("unary_stream", method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.channel_of(self._choose(method, None)).stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.channel_of(self._choose(method, None)).stream_stream(method, *args, **kwargs)

    async def channel_ready(self) -> None:
        await self.channel_of(self._default).channel_ready()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.channel_of(self._default).get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.channel_of(self._default).wait_for_state_change(last_observed_state)

    async def close(self, grace: float | None = None) -> None:
        for ch in self._channels.values():
            await ch.close(grace)
        self._channels.clear()

    async def __aenter__(self) -> RoutedChannel[K]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo a peer attached to a failed call, if any."""
    for key, value in err.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


_CODE_TO_ERROR: dict[grpc.StatusCode, type[DomainError]] = {}


def as_domain_error(err: grpc.aio.AioRpcError, peer: str) -> DomainError:
    """Re-raise a peer's precise failure as our own, keeping its code and reason."""
    from . import errors

    if not _CODE_TO_ERROR:
        for cls in vars(errors).values():
            if isinstance(cls, type) and issubclass(cls, DomainError) and cls is not DomainError:
                _CODE_TO_ERROR.setdefault(cls.code, cls)
    info = error_info(err)
    cls = _CODE_TO_ERROR.get(err.code())
    if info is not None and cls is not None:
        meta = dict(info.metadata)
        field = meta.pop("field", "")
        return cls(info.reason, err.details() or info.reason, field=field, **meta)
    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"{peer.upper()}_UNAVAILABLE", f"{peer} did not answer in time")
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument("INVALID_ARGUMENT", err.details() or "invalid argument")
    return Unavailable(f"{peer.upper()}_FAILED", f"{peer} failed: {err.code().name}")
