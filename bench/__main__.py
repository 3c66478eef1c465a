"""make bench: every benchmark, one after the other; results in bench/results/*.json.

Each reports throughput and p50/p99 with a same-run baseline as a ratio (see docs/benchmarks.md).
"""

from __future__ import annotations

from bench import audit, checkout, claim_rush, eventstore, verify_item


def main() -> None:
    eventstore.main([])  # EventStore.append against eventsourcing's recorder, same server
    print()
    verify_item.main([])
    print()
    checkout.main([])
    print()
    claim_rush.main([])  # N = 50,000 consumers, daily quota Q = 10,000
    print()
    audit.main([])  # about three minutes: a million events into the tree and verified


if __name__ == "__main__":
    main()
