"""Rate limits per authenticated client: registration, claims and checkout, each its own bucket.

One platform that loops (a bug, a scraper, the registration-factor oracle the review found)
must not starve the others or the identity authority behind eligibility. Each client, named
by its certificate (``caller().principal``, set by the authorisation interceptor, which runs
first), gets a bucket per class of call: registration (RegisterConsumer), claims
(ClaimQualification) and checkout (ReserveSubsidy, CaptureSubsidy, ReleaseSubsidy), sized by
``SUBSIDY_RATE_REGISTRATION``, ``SUBSIDY_RATE_CLAIMS`` and ``SUBSIDY_RATE_CHECKOUT``. A call over
its bucket is refused before any handler runs (so it changes nothing) with
``RESOURCE_EXHAUSTED``, ``ErrorInfo{reason: RATE_LIMITED}`` and a ``google.rpc.RetryInfo``
saying when the bucket has room again.

The bucket is the ``limits`` library's (the one Flask-Limiter and SlowAPI use): its asyncio
in-memory storage needs no server, it reads ``200/second`` strings as they are written, and
its moving window (never more than N calls in any period, so a burst is at most N, as with a
token bucket of N tokens) tells exactly when the oldest call leaves the window, which is the
retry delay. ``aiolimiter`` was the other candidate; it makes a caller wait rather than refuse
it and does not say when capacity returns. The limits are per process: behind N replicas a
client may make up to N times the rate, which the chart's values account for.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from . import metrics
from .errors import DomainError, ResourceExhausted
from .handler_cache import MethodWrapper
from .identity import caller
from .settings import Settings, SettingsError

log = logging.getLogger(__name__)

REGISTRATION: Final = "registration"
CLAIMS: Final = "claims"
CHECKOUT: Final = "checkout"

# Which bucket each limited method draws from; every other method is not limited here.
BUCKETS: Final[Mapping[str, str]] = {
    "/subsidy.v1.EligibilityService/RegisterConsumer": REGISTRATION,
    "/subsidy.v1.EligibilityService/ClaimQualification": CLAIMS,
    "/subsidy.v1.LedgerService/ReserveSubsidy": CHECKOUT,
    "/subsidy.v1.LedgerService/CaptureSubsidy": CHECKOUT,
    "/subsidy.v1.LedgerService/ReleaseSubsidy": CHECKOUT,
}

# What the settings accept: what an operator would write, and nothing limits would read
# differently (it also takes "5 per 2 hours" or several limits separated by ";").
_RATE = re.compile(r"[1-9][0-9]{0,8}/(second|minute|hour)")


def parse_rate(variable: str, raw: str) -> RateLimitItem:
    """``raw`` (``N/second``, ``N/minute`` or ``N/hour``) as a limit; SettingsError names
    ``variable`` otherwise."""
    if not _RATE.fullmatch(raw.strip()):
        raise SettingsError(
            f"{variable} must be N/second, N/minute or N/hour (N ≥ 1), got {raw[:40]!r}"
        )
    return parse(raw.strip())


@dataclass(frozen=True)
class RateLimits:
    """The size of each bucket, one each per client."""

    registration: RateLimitItem
    claims: RateLimitItem
    checkout: RateLimitItem

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        """The limits a service's settings name (SettingsError for a malformed one)."""
        return cls(
            registration=parse_rate("SUBSIDY_RATE_REGISTRATION", settings.rate_registration),
            claims=parse_rate("SUBSIDY_RATE_CLAIMS", settings.rate_claims),
            checkout=parse_rate("SUBSIDY_RATE_CHECKOUT", settings.rate_checkout),
        )

    def of(self, bucket: str) -> RateLimitItem:
        """The limit of ``bucket`` (one of :data:`BUCKETS`' values)."""
        found: RateLimitItem = getattr(self, bucket)
        return found


def rate_limited(bucket: str, limit: RateLimitItem, delay_s: float) -> ResourceExhausted:
    """The refusal of a call over its client's ``bucket``."""
    return ResourceExhausted(
        "RATE_LIMITED",
        f"too many {bucket} calls from this client (at most {limit}): retry in {delay_s:.3f} s",
        bucket=bucket,
    )


def retry_info(delay_s: float) -> error_details_pb2.RetryInfo:
    """``google.rpc.RetryInfo`` for a delay, rounded up to the millisecond (never zero)."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(1, math.ceil(delay_s * 1000)))
    return error_details_pb2.RetryInfo(retry_delay=delay)


ServicerContext = Any  # grpc.aio.ServicerContext
Handler = Any  # grpc.RpcMethodHandler
Reject = Callable[[ServicerContext, DomainError, Message], Awaitable[None]]


class RateLimitInterceptor(MethodWrapper):
    """Refuses a limited method's call once its client has used up the method's bucket.

    It must run after the authorisation interceptor (rpc.build_server places it so): the
    bucket is the authenticated caller's. ``reject`` aborts the call with the error's status
    and the RetryInfo beside its ErrorInfo."""

    def __init__(self, rates: RateLimits, reject: Reject) -> None:
        self._rates = rates
        self._reject = reject
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        super().__init__()

    def wrap(self, method: str, handler: Handler) -> Handler:
        bucket = BUCKETS.get(method)
        if bucket is None or handler.unary_unary is None:
            return handler
        limit = self._rates.of(bucket)
        inner = handler.unary_unary
        limiter = self._limiter

        async def limited(request: Any, context: ServicerContext) -> Any:
            who = caller().principal
            if not await limiter.hit(limit, bucket, who):
                stats = await limiter.get_window_stats(limit, bucket, who)
                delay_s = stats.reset_time - time.time()
                error = rate_limited(bucket, limit, delay_s)
                metrics.RPC_REFUSALS.labels(method, error.reason).inc()
                log.warning("rate-limited %s for %s", method, who)
                await self._reject(context, error, retry_info(delay_s))
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            limited, handler.request_deserializer, handler.response_serializer
        )
