"""``make chaos``: the long chaos run (not in CI), at least 100 injections by default.

  python -m tests.chaos [--injections N] [--report PATH] [--run-dir DIR] [--keep]

The seed is ``SUBSIDY_CHAOS_SEED`` (the Makefile draws a fresh one and prints it); the same seed
replays the same plan of injections (tests/chaos/engine.py). Prints a table and writes the report
as JSON (default bench/results/chaos.json); exits 1 if anything broke.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

from tests.chaos import engine

REPO = Path(__file__).resolve().parent.parent.parent


def main(argv: list[str] | None = None) -> int:
    """Run the long chaos run and report it; 0 when every invariant held."""
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--injections", type=int, default=100)
    parser.add_argument("--report", type=Path, default=REPO / "bench" / "results" / "chaos.json")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: a temporary one")
    parser.add_argument("--nats-nodes", type=int, default=3)
    args = parser.parse_args(argv)
    # A harness variable, as SUBSIDY_FUZZ_SEED: no service process reads it.
    seed = int(os.environ.get("SUBSIDY_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"chaos seed {seed} (replay: make chaos SUBSIDY_CHAOS_SEED={seed})", flush=True)
    with tempfile.TemporaryDirectory(prefix="subsidy-chaos-") as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        report = engine.run(
            run_dir,
            seed,
            args.injections,
            nats_nodes=args.nats_nodes,
            say=lambda line: print(line, flush=True),
        )
    print(report.table(), flush=True)
    report.write(args.report)
    print(f"report: {args.report}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
