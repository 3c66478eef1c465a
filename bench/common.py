"""What every benchmark shares: a bounded concurrent driver and the summary row."""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")


def summarise(name: str, latencies_s: list[float], wall_s: float) -> dict[str, Any]:
    """Throughput and p50/p99 latency (ms) of one measured operation."""
    ms = sorted(x * 1000 for x in latencies_s)
    return {
        "name": name,
        "count": len(ms),
        "throughput_per_s": round(len(ms) / wall_s, 1),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
    }


def against_baseline(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    """Each row's throughput as a ratio of the same run's baseline (machines here are noisy)."""
    for row in rows:
        row["throughput_vs_baseline"] = round(
            row["throughput_per_s"] / baseline["throughput_per_s"], 3
        )


async def timed(
    count: int, concurrency: int, op: Callable[[int], Awaitable[None]]
) -> tuple[list[float], float]:
    """Run ``op(i)`` for i in 0..count-1 with ``concurrency`` in flight; latencies, wall time."""
    latencies: list[float] = []
    next_i = iter(range(count))

    async def worker() -> None:
        for i in next_i:
            t = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


def report(name: str, result: dict[str, Any]) -> None:
    """Write ``bench/results/<name>.json`` (normalised: :func:`normalise`) and print the rows as a
    table."""
    write_result(name, result)
    width = max(len(row["name"]) for row in result["rows"])
    print(f"{'operation':{width}} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs base':>8}")
    for row in result["rows"]:
        print(
            f"{row['name']:{width}} {row['throughput_per_s']:9.1f} {row['p50_ms']:8.2f}"
            f" {row['p99_ms']:8.2f} {row['throughput_vs_baseline']:8.3f}"
        )


# -- one result shape and one table for `make bench` -------------------------------------------
# Every benchmark's JSON carries these keys beside its own fields (which are kept): the headline
# operation, its throughput and latency, the same-run baseline or peer it is compared with, and
# the ratio. A figure a benchmark does not measure (a latency of an offline computation) is null.
COMMON_KEYS = (
    "benchmark",
    "operation",
    "throughput_per_s",
    "p50_ms",
    "p99_ms",
    "baseline",
    "baseline_per_s",
    "ratio",
)


def _row(result: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """The first of ``result['rows']`` whose name starts with ``prefix``."""
    return next(
        (r for r in result.get("rows", []) if str(r.get("name", "")).startswith(prefix)), None
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _from_rows(result: dict[str, Any], op: str, base: str) -> dict[str, Any]:
    row, baseline = _row(result, op), _row(result, base)
    if row is None:
        return {}
    out: dict[str, Any] = {
        "operation": row["name"],
        "throughput_per_s": row.get("throughput_per_s"),
        "p50_ms": row.get("p50_ms"),
        "p99_ms": row.get("p99_ms"),
    }
    if baseline is not None:
        out["baseline"] = baseline["name"]
        out["baseline_per_s"] = baseline.get("throughput_per_s")
        out["ratio"] = _ratio(out["throughput_per_s"], out["baseline_per_s"])
    return out


def _checkout(result: dict[str, Any]) -> dict[str, Any]:
    """A checkout is a reservation and its capture: checkouts/s from both phases' rates (one
    after the other on the same orders), latency of the reservation (the issue's p99 target)."""
    out = _from_rows(result, "ReserveSubsidy", "baseline")
    capture = _row(result, "CaptureSubsidy")
    reserve_per_s = out.get("throughput_per_s")
    if capture is not None and reserve_per_s and capture.get("throughput_per_s"):
        per_s = 1 / (1 / reserve_per_s + 1 / capture["throughput_per_s"])
        out["operation"] = "checkout (ReserveSubsidy + CaptureSubsidy); p50/p99 of the reserve"
        out["throughput_per_s"] = round(per_s, 1)
        out["ratio"] = _ratio(out["throughput_per_s"], out.get("baseline_per_s"))
    return out


def _claim_rush(result: dict[str, Any]) -> dict[str, Any]:
    row = result.get("baseline_detail") or result.get("baseline")  # raw, or normalised already
    baseline: dict[str, Any] = row if isinstance(row, dict) else {}
    return {
        "operation": "ClaimQualification under the 10:00 rush",
        "throughput_per_s": result.get("claims_per_s"),
        "p50_ms": result.get("p50_ms"),
        "p99_ms": result.get("p99_ms"),
        "baseline": baseline.get("name"),
        "baseline_per_s": baseline.get("throughput_per_s"),
        "ratio": result.get("claims_vs_baseline")
        or _ratio(result.get("claims_per_s"), baseline.get("throughput_per_s")),
    }


def _audit(result: dict[str, Any]) -> dict[str, Any]:
    # No peer runs beside it: the figure it is held against is the issue's target.
    target = (result.get("targets") or {}).get("verify_per_s")
    return {
        "operation": "subsidyctl audit verify (events/s)",
        "throughput_per_s": result.get("verify_per_s"),
        "baseline": "target (issue), not a same-run peer" if target else None,
        "baseline_per_s": target,
        "ratio": _ratio(result.get("verify_per_s"), target),
    }


def _overload(result: dict[str, Any]) -> dict[str, Any]:
    """What is still served at twice the capacity, against the capacity measured in the run."""
    rows = {r["name"]: r for r in result.get("rows", [])}
    twice = rows.get("2x capacity") or {}
    capacity = result.get("capacity_per_s")
    return {
        "operation": "ReserveSubsidy admitted at 2x capacity (bounded)",
        "throughput_per_s": twice.get("admitted_per_s"),
        "p50_ms": twice.get("admitted_p50_ms"),
        "p99_ms": twice.get("admitted_p99_ms"),
        "baseline": "closed-loop capacity, same run",
        "baseline_per_s": capacity,
        "ratio": _ratio(twice.get("admitted_per_s"), capacity),
    }


def _fraud(result: dict[str, Any]) -> dict[str, Any]:
    events, seconds = result.get("events"), result.get("detect_s")
    return {
        "operation": "fraud detectors over the log (events/s)",
        "throughput_per_s": round(events / seconds, 1) if events and seconds else None,
    }


def _generic(result: dict[str, Any]) -> dict[str, Any]:
    """A benchmark with no extractor of its own (bench.eventstore, a new one): the common keys
    it sets itself (``normalise`` keeps them), else its first row against the first row whose
    name says ``baseline`` or ``peer``."""
    rows = [r for r in result.get("rows", []) if isinstance(r, dict) and "name" in r]
    base = next((r["name"] for r in rows if re.search("baseline|peer", str(r["name"]))), None)
    op = next((r["name"] for r in rows if r["name"] != base), None)
    return {} if op is None else _from_rows(result, op, base or "\0")


def _eventstore(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's figure: EventStore.append at 8 writers against the peer at 8 writers."""
    return _from_rows(result, "EventStore.append, 8 writer(s)", "peer: eventsourcing, 8 writer(s)")


EXTRACTORS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "eventstore": _eventstore,
    "verify_item": lambda r: _from_rows(r, "VerifyItem", "baseline"),
    "checkout": _checkout,
    "claim_rush": _claim_rush,
    "audit": _audit,
    "overload": _overload,
    "fraud": _fraud,
}


def normalise(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the common keys (:data:`COMMON_KEYS`) first and its own fields kept; a
    common key the benchmark already sets itself wins over the derived one."""
    # By the result's name, else by the benchmark it says it is (checkout-2workers: checkout).
    extract = EXTRACTORS.get(name) or EXTRACTORS.get(str(result.get("benchmark")), _generic)
    derived = extract(result)
    head: dict[str, Any] = {k: None for k in COMMON_KEYS}
    head.update(derived)
    # A figure of its own under a common key wins; a structure there (claim_rush's baseline
    # row) is kept beside it as ``<key>_detail``.
    own = {k: result[k] for k in COMMON_KEYS if result.get(k) is not None}
    head.update({k: v for k, v in own.items() if not isinstance(v, dict | list)})
    head["benchmark"] = name
    rest = {
        (f"{k}_detail" if k in head and isinstance(v, dict | list) else k): v
        for k, v in result.items()
    }
    return {**head, **{k: v for k, v in rest.items() if k not in head}}


def write_result(name: str, result: dict[str, Any], directory: Path = RESULTS) -> Path:
    """Write the normalised ``result`` to ``<directory>/<name>.json``; returns the path."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(normalise(name, result), indent=2, ensure_ascii=False) + "\n")
    return path


def _cell(value: Any, spec: str) -> str:
    width = int(re.match(r"\d*", spec).group() or 0)  # type: ignore[union-attr]
    return f"{'-':>{width}}" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    """One line per benchmark (normalised results): what ``python -m bench`` prints last."""
    width = max([12, *(len(str(r["benchmark"])) for r in results)])
    lines = [
        f"{'benchmark':{width}} {'per s':>10} {'p50 ms':>8} {'p99 ms':>8} {'base per s':>11}"
        f" {'ratio':>7}  operation / against"
    ]
    for r in results:
        against = f" / {r['baseline']}" if r.get("baseline") else ""
        lines.append(
            f"{r['benchmark']:{width}} {_cell(r.get('throughput_per_s'), '10,.1f')}"
            f" {_cell(r.get('p50_ms'), '8.2f')} {_cell(r.get('p99_ms'), '8.2f')}"
            f" {_cell(r.get('baseline_per_s'), '11,.1f')} {_cell(r.get('ratio'), '7.3f')}"
            f"  {r.get('operation') or ''}{against}"
        )
    return "\n".join(lines)


def service_label(cmdline: list[str]) -> str | None:
    """``ledger`` for ``python -m services.ledger``, ``ledger[1]`` for its worker 1 (``--worker
    1``), ``ledger[supervisor]`` for the process that starts the workers; None for a process
    that is not a service."""
    module = next((a for a in cmdline if a.startswith("services.")), None)
    if module is None:
        return None
    name = module.removeprefix("services.")
    if "--worker" in cmdline:
        i = cmdline.index("--worker")
        return f"{name}[{cmdline[i + 1]}]" if i + 1 < len(cmdline) else name
    return f"{name}[supervisor]" if "--workers-supervisor" in cmdline else name


class RssMeter:
    """Peak resident memory (MB) of each service process this process started, directly or
    not, sampled every ``every_s`` while the load runs (``async with RssMeter() as rss``)."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.peak_mb: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                label = service_label(proc.cmdline())
                rss = proc.memory_info().rss / 2**20
            except psutil.Error:
                continue
            if label is not None:
                self.peak_mb[label] = round(max(rss, self.peak_mb.get(label, 0.0)), 1)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every_s)

    async def __aenter__(self) -> RssMeter:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sample()
