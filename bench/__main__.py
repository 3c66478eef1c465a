"""make bench: every benchmark, one after the other; results in bench/results/*.json.

Each result is one JSON object with the common keys of bench/common.py (throughput, p50/p99,
the same-run baseline or peer and the ratio) beside the benchmark's own fields, and one table of
all of them is printed at the end (docs/benchmarks.md).

``python -m bench --quick`` (``make bench-quick``) runs each with small sizes, each well under a
minute, as a smoke check: its results go to bench/results/quick/ and the full results the
repository keeps are left as they were. ``--only NAME`` (repeatable) runs the named ones.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from bench.common import RESULTS, normalise, table, write_result


@dataclass(frozen=True)
class Benchmark:
    """One benchmark run: the result's name, its module, and its arguments (full and quick)."""

    name: str
    module: str
    argv: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    # The file the module itself writes (bench/results/<file>.json), when not ``name``.
    file: str | None = None


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("verify_item", "bench.verify_item", (), ("--calls", "300")),
    # Concurrency 4 in the smoke run: on a busy machine 16 reservations on the one pool queue
    # past the platform's 5 s deadline.
    Benchmark(
        "checkout",
        "bench.checkout",
        ("--workers", "1"),
        ("--orders", "40", "--concurrency", "4"),
    ),
    # The same load with two worker processes per service on each port (SO_REUSEPORT).
    Benchmark(
        "checkout-2workers",
        "bench.checkout",
        ("--workers", "2"),
        ("--orders", "40", "--concurrency", "4", "--workers", "2"),
    ),
    # Many pools (a campaign's districts and categories, each its own pool), and ONE hot pool
    # split into shards, both at concurrency 64 (issue 14's two checkout rows).
    Benchmark(
        "checkout-16pools",
        "bench.checkout",
        ("--orders", "800", "--concurrency", "64", "--pools", "16", "--deadline", "30"),
        ("--orders", "80", "--concurrency", "16", "--pools", "16", "--deadline", "30"),
    ),
    Benchmark(
        "checkout-8shards",
        "bench.checkout",
        ("--orders", "800", "--concurrency", "64", "--pool-shards", "8", "--deadline", "30"),
        ("--orders", "80", "--concurrency", "16", "--pool-shards", "8", "--deadline", "30"),
    ),
    # N = 50,000 consumers, daily quota Q = 10,000; the quick run also offers two rates open
    # loop (fresh consumers and a category each), so the mode is exercised.
    Benchmark(
        "claim_rush",
        "bench.claim_rush",
        (),
        (
            "--consumers",
            "2000",
            "--quota",
            "500",
            "--concurrency",
            "32",
            "--rates",
            "100,200",
            "--rate-seconds",
            "2",
        ),
    ),
    # about three minutes: a million events into the tree and verified
    Benchmark("audit", "bench.audit", (), ("--events", "20000")),
    Benchmark("overload", "bench.overload", (), ("--seconds", "2", "--capacity-orders", "40")),
    # In memory and quick at full size (fewer orders leave the merchant anomaly unfound).
    Benchmark("fraud", "bench.fraud", (), ("--orders", "20000")),
    # EventStore.append against the eventsourcing library's recorder (bench-only dependency);
    # skipped while the module is absent. Its quick arguments are its own QUICK_ARGV, if any.
    Benchmark("eventstore", "bench.eventstore", (), ("--quick",)),
    # The floor under the checkout: each hop's CPU x its count per checkout, both measured.
    Benchmark(
        "floor",
        "bench.floor",
        (),
        ("--orders", "20", "--concurrency", "4", "--commits", "200"),
    ),
)


def available(bench: Benchmark) -> bool:
    """Whether the benchmark's module is in this checkout."""
    return importlib.util.find_spec(bench.module) is not None


def run_one(bench: Benchmark, quick: bool) -> dict[str, Any]:
    """Run one benchmark in this process; its normalised result. With ``quick`` the full result
    file it writes is put back as it was and the quick one goes to bench/results/quick/."""
    module = importlib.import_module(bench.module)
    argv = list(bench.quick if quick else bench.argv)
    if quick and not bench.quick:
        argv = list(getattr(module, "QUICK_ARGV", ()))
    written = RESULTS / f"{bench.file or bench.name}.json"
    kept = written.read_bytes() if quick and written.exists() else None
    try:
        raw = module.main(argv)
        if raw is None:  # a main that only writes its file
            raw = json.loads(written.read_text())
    finally:
        if quick:
            if kept is not None:
                written.write_bytes(kept)
            else:
                written.unlink(missing_ok=True)
    write_result(bench.name, raw, RESULTS / "quick" if quick else RESULTS)
    return normalise(bench.name, raw)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; print the table; non-zero if any failed."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only NAME")
    args = parser.parse_args(argv)
    names = {b.name for b in BENCHMARKS}
    unknown = set(args.only or ()) - names
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}; known: {sorted(names)}")
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    for bench in BENCHMARKS:
        if args.only and bench.name not in args.only:
            continue
        if not available(bench):
            print(f"\n== {bench.name}: skipped ({bench.module} is not in this checkout)")
            continue
        print(f"\n== {bench.name}{' (quick)' if args.quick else ''}", flush=True)
        t0 = time.monotonic()
        try:
            result = run_one(bench, args.quick)
        except (Exception, SystemExit):
            traceback.print_exc()
            failed.append(bench.name)
            continue
        result["wall_s"] = round(time.monotonic() - t0, 1)
        results.append(result)
        print(f"== {bench.name}: {result['wall_s']} s", flush=True)
    print()
    print(table(results))
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
