"""Every RPC of every service, fuzzed: never INTERNAL or UNKNOWN, health stays SERVING, and a
refused request changes nothing (tests/fuzz/engine.py says how each rule is checked).

CI runs a short version (``SUBSIDY_FUZZ_REQUESTS`` per service, a few hundred by default) with
a fixed seed; ``make fuzz`` runs the long one (10,000 per service) with a fresh seed it prints.
A failing run replays with ``SUBSIDY_FUZZ_SEED=<seed>`` (and ``SUBSIDY_FUZZ_ONLY=<Method>`` to
fuzz only the RPCs whose path contains it).
"""

from __future__ import annotations

import os

from tests.fuzz import engine
from tests.fuzz.conftest import Seeded

SEED = int(os.environ.get("SUBSIDY_FUZZ_SEED", "20261201"))
PER_SERVICE = int(os.environ.get("SUBSIDY_FUZZ_REQUESTS", "300"))
ONLY = os.environ.get("SUBSIDY_FUZZ_ONLY", "")
# Tables that grow on a clock whatever anyone calls: the audit service signs a tree head every
# SUBSIDY_CHECKPOINT_INTERVAL_S.
CLOCK_DRIVEN = frozenset({"audit.audit_checkpoints"})


async def test_every_rpc_survives_generated_and_mutated_requests(
    fuzz_platform: Seeded,
) -> None:
    p = fuzz_platform.platform
    every = engine.targets(p.running)
    assert len(every) >= 39  # all the services' RPCs, as the issue counted them
    assert {t.process for t in every} == set(p.running)
    chosen = [t for t in every if ONLY in t.path]
    fuzzer = engine.Fuzzer(
        p.running,
        p.infra.identities,
        fuzz_platform.settle,
        fuzz_platform.known,
        SEED,
        clock_driven=CLOCK_DRIVEN,
    )
    try:
        report = await fuzzer.run(chosen, PER_SERVICE)
    finally:
        await fuzzer.close()
    print(report.summary())  # make fuzz shows it (pytest -s); a failure shows it below
    if not ONLY:
        for process in p.running:
            assert report.requests[process] >= PER_SERVICE, report.summary()
    assert report.state_checks > 0
    assert report.findings == [], report.summary()
