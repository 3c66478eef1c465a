"""Prometheus metrics every service exports on SUBSIDY_METRICS_LISTEN (/metrics).

Names follow Prometheus conventions; label values are bounded (method names, status codes,
reasons, pool and category ids): never an order id or anything personal.

With several worker processes (SUBSIDY_WORKERS) the service's one ``/metrics`` is served by
the supervisor and is the sum over its workers: prometheus_client's multiprocess mode, each
worker writing its values to files in a directory the supervisor made (:func:`across_workers`).
How a gauge adds up over workers is its ``multiprocess_mode``: calls in flight sum over the
live workers; the lag gauges, which any worker may refresh, and a pool's figures, set after the
latest event, show the most recent value; a threshold once reached stays reached (max).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client import start_http_server as _start_http_server

# prometheus_client's own variable: a process that starts with it set keeps its values in
# files there (multiprocess mode) instead of in memory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

RPC_LATENCY = Histogram(
    "subsidy_rpc_duration_seconds",
    "Server-side latency of each gRPC method, by outcome.",
    ["method", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RPC_REFUSALS = Counter(
    "subsidy_rpc_refusals_total",
    "Calls refused with a domain error, by method and machine-readable reason.",
    ["method", "reason"],
)
ADMISSIONS = Counter(
    "subsidy_rpc_admissions_total",
    "Unary calls the admission bound let in or refused as OVERLOADED, by method.",
    ["method", "outcome"],
)
ADMISSION_IN_FLIGHT = Gauge(
    "subsidy_rpc_in_flight",
    "Calls this process is working on now, by admission class (writes, reads).",
    ["class"],
    multiprocess_mode="livesum",
)
EVENTS_PUBLISHED = Counter(
    "subsidy_relay_published_total", "Events the outbox relay published to JetStream."
)
EVENTS_HANDLED = Counter(
    "subsidy_consumer_handled_total", "Events a durable consumer handled.", ["consumer"]
)
CONSUMER_OUTAGES = Counter(
    "subsidy_consumer_outage_retries_total",
    "Event deliveries retried because a part (database, NATS, Vault) was down; not failures.",
    ["consumer", "part"],
)
DEAD_LETTERED = Counter(
    "subsidy_consumer_dead_lettered_total",
    "Poison events moved to the dead-letter stream (alert on any increase).",
    ["consumer"],
)
EVENTS_REFUSED = Counter(
    "subsidy_consumer_refused_total",
    "Messages a consumer refused as not from the event's owner (alert on any increase: a forged"
    " or misrouted event); each is dead-lettered and changes nothing.",
    ["consumer", "reason"],
)
# Lag, refreshed in the background every few seconds (services.kernel.app), never on the hot
# path: what the relay has not yet published, and what each durable consumer has not yet handled.
RELAY_BACKLOG = Gauge(
    "subsidy_relay_unpublished_events",
    "Events in the service's outbox (events table) after the relay's checkpoint.",
    multiprocess_mode="livemostrecent",
)
RELAY_BACKLOG_AGE = Gauge(
    "subsidy_relay_oldest_unpublished_age_seconds",
    "How long ago the oldest event the relay has not yet published was recorded (0: none).",
    multiprocess_mode="livemostrecent",
)
CONSUMER_PENDING = Gauge(
    "subsidy_consumer_pending_messages",
    "Messages of a durable consumer's filter not yet delivered to it (JetStream num_pending).",
    ["consumer"],
    multiprocess_mode="livemostrecent",
)
CONSUMER_ACK_PENDING = Gauge(
    "subsidy_consumer_ack_pending_messages",
    "Messages delivered to a durable consumer and not yet acknowledged (num_ack_pending).",
    ["consumer"],
    multiprocess_mode="livemostrecent",
)
LAG_REFRESHED = Gauge(
    "subsidy_lag_refreshed_timestamp_seconds",
    "When the lag gauges were last refreshed (Unix time): a stale value means they are stale.",
    multiprocess_mode="livemax",
)
UNPUBLISHABLE = Gauge(
    "subsidy_relay_stuck",
    "1 while the outbox relay cannot publish an event (health is NOT_SERVING; see the log).",
    ["event_id"],
    multiprocess_mode="livemax",
)
BUDGET = Gauge(
    "subsidy_budget_fen",
    "A budget pool's figures in fen after its latest event (funded, available, reserved, spent,"
    " scheduled).",
    ["pool", "bucket"],
    multiprocess_mode="mostrecent",
)
BUDGET_SOURCE = Gauge(
    "subsidy_budget_source_fen",
    "One funding source's money in a budget pool, in fen (funded, available, reserved, spent,"
    " scheduled).",
    ["pool", "source", "bucket"],
    multiprocess_mode="mostrecent",
)
BUDGET_CATEGORY = Gauge(
    "subsidy_budget_category_fen",
    "What one category holds (reserved) and has spent of a budget pool, in fen.",
    ["pool", "category", "bucket"],
    multiprocess_mode="mostrecent",
)
BUDGET_THRESHOLD = Gauge(
    "subsidy_budget_threshold_reached",
    "1 once a spent share of the policy's alert thresholds is reached (category empty: the whole"
    " pool); raised once per threshold, never reset.",
    ["pool", "category", "threshold_bp"],
    multiprocess_mode="max",
)
RESERVATIONS = Counter(
    "subsidy_reservations_total",
    "Reservation outcomes: reserved, captured, released by reason.",
    ["outcome"],
)
BATCH_SIZE = Histogram(
    "subsidy_batch_size",
    "Commands decided together in one group-commit batch (services/kernel/batching.py).",
    ["batch"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


def serve(listen: str, registry: CollectorRegistry = REGISTRY) -> None:
    """Serve ``registry`` on ``listen`` (``host:port``; an empty host is every address) at
    ``/metrics``, from a daemon thread."""
    host, _, port = listen.rpartition(":")
    _start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)


@contextmanager
def across_workers(listen: str | None) -> Iterator[dict[str, str]]:
    """For a supervisor of several workers: a fresh directory for the workers' metrics, their
    sum served on ``listen`` (when set), the directory removed at the end. Yields what to add
    to the workers' environment (:data:`MULTIPROC_ENV`). A worker that ends takes its
    supervisor down with it (services/kernel/workers.py), so no dead process's values linger
    into the next start."""
    path = tempfile.mkdtemp(prefix="subsidy-metrics-")
    try:
        if listen:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
            serve(listen, registry)
        yield {MULTIPROC_ENV: path}
    finally:
        shutil.rmtree(path, ignore_errors=True)
