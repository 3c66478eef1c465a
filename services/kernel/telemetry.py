"""OpenTelemetry set-up and JSON logs carrying trace ids.

Exporters follow the standard ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``) and the
sampler the standard ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (parent-based by
default: a call or an event whose caller kept its trace is kept, so one checkout stays one whole
trace or none; production samples a ratio of new traces, tests keep all); the local stack adds
``SUBSIDY_TRACE_FILE``: spans as JSON lines in the run folder, so a developer
(and ``make smoke``) can follow one checkout across processes without a collector.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

_configured = False
_tracer: trace.Tracer | None = None

# OTEL_TRACES_SAMPLER's values (the OpenTelemetry SDK's names); the ratio ones read
# OTEL_TRACES_SAMPLER_ARG, 1.0 when unset, as the specification says.
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def sampler(name: str, arg: float | None = None) -> sampling.Sampler:
    """The sampler OTEL_TRACES_SAMPLER names, with OTEL_TRACES_SAMPLER_ARG as its ratio.

    Built here rather than left to the SDK's own reading of the environment: the platform
    reads its variables once, in services.kernel.settings, and refuses an unknown name at
    start instead of silently tracing everything."""
    if name not in SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER must be one of {', '.join(SAMPLERS)}, got {name!r}")
    ratio = 1.0 if arg is None else arg
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1, got {arg!r}")
    root: sampling.Sampler
    kind = name.removeprefix("parentbased_")
    if kind == "always_on":
        root = sampling.ALWAYS_ON
    elif kind == "always_off":
        root = sampling.ALWAYS_OFF
    else:
        root = sampling.TraceIdRatioBased(ratio)
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line to a file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            if ctx is None:
                continue
            lines.append(
                json.dumps(
                    {
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
                        "name": span.name,
                        "service": span.resource.attributes.get("service.name"),
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "status": span.status.status_code.name,
                    }
                )
            )
        with self._lock, self._path.open("a") as fh:
            fh.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def configure_tracing(
    service: str,
    *,
    trace_file: Path | None = None,
    exporter: SpanExporter | None = None,
    service_name: str | None = None,
    traces_exporter: str = "none",
    traces_sampler: str = "parentbased_always_on",
    traces_sampler_arg: float | None = None,
) -> TracerProvider:
    """Install the process's tracer provider once; later calls return the installed one.

    ``service_name``, ``traces_exporter``, ``traces_sampler`` and ``traces_sampler_arg`` are
    OTEL_SERVICE_NAME, OTEL_TRACES_EXPORTER, OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG as
    the process's settings read them (services.kernel.settings)."""
    global _configured
    current = trace.get_tracer_provider()
    if _configured and isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name or service}),
        sampler=sampler(traces_sampler, traces_sampler_arg),
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if trace_file is not None:
        # Batched: a write per span would cost the hot path a file open and close each time.
        provider.add_span_processor(
            BatchSpanProcessor(JsonLinesSpanExporter(trace_file), schedule_delay_millis=200)
        )
    kind = traces_exporter
    if kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    return provider


def tracer() -> trace.Tracer:
    """The platform's tracer, looked up once: ``trace.get_tracer`` builds a tracer (and its
    instrumentation scope) on every call, which the checkout's profile showed on every
    relay publish and consumed event. Before a provider is installed this is the API's proxy
    tracer, which follows the provider installed later."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer("subsidy")
    return _tracer


def extract(carrier: Mapping[str, str]) -> Context:
    """The trace context carried in NATS headers or an event's metadata."""
    return propagate.extract(dict(carrier))


def inject() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the current trace and span ids."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        span = trace.get_current_span().get_span_context()
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if span.is_valid:
            out["trace_id"] = format(span.trace_id, "032x")
            out["span_id"] = format(span.span_id, "016x")
        for key in ("event_id", "event_type", "stream_id", "reason", "alert"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(service: str, level: str = "INFO", log_file: Path | None = None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("nats", "sqlalchemy", "urllib3", "hvac"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
