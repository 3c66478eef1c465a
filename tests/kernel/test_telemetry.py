"""Trace sampling from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, and the cached tracer.

Parent-based sampling is what keeps one checkout one whole trace: a service samples a new trace
by its ratio, and follows its caller's decision for a call (or an event) that carries one.
"""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.kernel import telemetry
from services.kernel.settings import SettingsError, SimulatorSettings

BASE = {"SUBSIDY_GRPC_LISTEN": "127.0.0.1:1", "SUBSIDY_TLS_SOURCE": "files"}


def spans_kept(name: str, arg: float | None, *, parent: bool | None) -> int:
    """How many of 200 spans a provider with this sampler exports: new traces (``parent``
    None) or children of a remote caller that kept (True) or dropped (False) its trace."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=telemetry.sampler(name, arg))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    for i in range(200):
        context = None
        if parent is not None:
            flags = TraceFlags(TraceFlags.SAMPLED if parent else TraceFlags.DEFAULT)
            caller = SpanContext(i + 1, i + 1, is_remote=True, trace_flags=flags)
            context = trace.set_span_in_context(NonRecordingSpan(caller))
        with tracer.start_as_current_span("call", context=context):
            pass
    return len(exporter.get_finished_spans())


def test_default_keeps_every_trace() -> None:
    settings = SimulatorSettings.from_env(BASE)
    assert settings.otel_traces_sampler == "parentbased_always_on"
    name, arg = settings.otel_traces_sampler, settings.otel_traces_sampler_arg
    assert spans_kept(name, arg, parent=None) == 200
    assert spans_kept(name, arg, parent=False) == 0  # the caller dropped it: so does this


def test_ratio_samples_new_traces_and_follows_the_caller() -> None:
    env = {**BASE, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}
    settings = SimulatorSettings.from_env({**env, "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    name, arg = settings.otel_traces_sampler, settings.otel_traces_sampler_arg
    assert arg == 0.25
    kept = spans_kept(name, arg, parent=None)
    assert 10 < kept < 120, kept  # about a quarter of 200 random trace ids
    assert spans_kept(name, arg, parent=True) == 200  # a kept checkout stays whole
    assert spans_kept(name, arg, parent=False) == 0
    assert spans_kept(name, 0.0, parent=None) == 0
    assert spans_kept("traceidratio", 0.0, parent=True) == 0  # not parent-based: ignores it


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER must be one of"),
        ({"OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG must be a ratio"),
        ({"OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG must be a number"),
    ],
)
def test_a_bad_sampler_stops_the_process_at_start(env: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        SimulatorSettings.from_env({**BASE, **env})


def test_tracer_is_looked_up_once() -> None:
    assert telemetry.tracer() is telemetry.tracer()
