"""What every benchmark shares: a bounded concurrent driver and the summary row."""

from __future__ import annotations

import asyncio
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
    """Write ``bench/results/<name>.json`` and print the rows as a table."""
    import json

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    width = max(len(row["name"]) for row in result["rows"])
    print(f"{'operation':{width}} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs base':>8}")
    for row in result["rows"]:
        print(
            f"{row['name']:{width}} {row['throughput_per_s']:9.1f} {row['p50_ms']:8.2f}"
            f" {row['p99_ms']:8.2f} {row['throughput_vs_baseline']:8.3f}"
        )
