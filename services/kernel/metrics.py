"""Prometheus metrics every service exports on SUBSIDY_METRICS_LISTEN (/metrics).

Names follow Prometheus conventions; label values are bounded (method names, status codes,
reasons, pool and category ids): never an order id or anything personal.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
)
RELAY_BACKLOG_AGE = Gauge(
    "subsidy_relay_oldest_unpublished_age_seconds",
    "How long ago the oldest event the relay has not yet published was recorded (0: none).",
)
CONSUMER_PENDING = Gauge(
    "subsidy_consumer_pending_messages",
    "Messages of a durable consumer's filter not yet delivered to it (JetStream num_pending).",
    ["consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "subsidy_consumer_ack_pending_messages",
    "Messages delivered to a durable consumer and not yet acknowledged (num_ack_pending).",
    ["consumer"],
)
LAG_REFRESHED = Gauge(
    "subsidy_lag_refreshed_timestamp_seconds",
    "When the lag gauges were last refreshed (Unix time): a stale value means they are stale.",
)
UNPUBLISHABLE = Gauge(
    "subsidy_relay_stuck",
    "1 while the outbox relay cannot publish an event (health is NOT_SERVING; see the log).",
    ["event_id"],
)
BUDGET = Gauge(
    "subsidy_budget_fen",
    "A budget pool's figures in fen after its latest event (funded, available, reserved, spent,"
    " scheduled).",
    ["pool", "bucket"],
)
BUDGET_SOURCE = Gauge(
    "subsidy_budget_source_fen",
    "One funding source's money in a budget pool, in fen (funded, available, reserved, spent,"
    " scheduled).",
    ["pool", "source", "bucket"],
)
BUDGET_CATEGORY = Gauge(
    "subsidy_budget_category_fen",
    "What one category holds (reserved) and has spent of a budget pool, in fen.",
    ["pool", "category", "bucket"],
)
BUDGET_THRESHOLD = Gauge(
    "subsidy_budget_threshold_reached",
    "1 once a spent share of the policy's alert thresholds is reached (category empty: the whole"
    " pool); raised once per threshold, never reset.",
    ["pool", "category", "threshold_bp"],
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
