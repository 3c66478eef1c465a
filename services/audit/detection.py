"""The post-hoc detectors (:mod:`.detectors`) run over the audit log as it grows, and every
finding opens a supervision case (:meth:`.cases.Cases.open_finding`, once per finding key).

The detectors' state is in memory: at start it is rebuilt from the whole log (the log is the
source of truth; a case already opened for a key is not opened again), then each round reads
only the entries added since, in log order, and asks every detector for its findings at the
round's instant. The rules are data: a YAML or JSON mapping of :class:`.detectors.DetectorRules`
(``SUBSIDY_DETECTOR_RULES_FILE``), the defaults without one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

import yaml

from services.kernel.background import every
from services.kernel.events import Envelope
from services.kernel.eventstore import EventStore

from . import log
from .cases import Cases
from .detectors import DetectorRules, Finding, detectors
from .totals import Rebuild

logger = logging.getLogger(__name__)
ALERT = "fraud-detection"
PAGE = 5000  # entries read per query


def rules_from_file(path: Path | None) -> DetectorRules:
    """The detectors' rules from ``path`` (a mapping of rule names to whole numbers), or the
    defaults; a file that cannot be read or names an unknown rule stops the service at start."""
    if path is None:
        return DetectorRules()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"SUBSIDY_DETECTOR_RULES_FILE {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"SUBSIDY_DETECTOR_RULES_FILE {path}: not a mapping of rules")
    return DetectorRules.from_mapping(data)


def summary_of(f: Finding) -> str:
    """A case's summary of a finding: its reason and evidence (ids and amounts only)."""
    evidence = ", ".join(f"{k}={v}" for k, v in f.evidence)
    return f"{f.detector} {f.reason}: {f.subject_kind} {f.subject}; {evidence}"


class Detection:
    """The detectors over the log, and the cases their findings open."""

    def __init__(
        self,
        store: EventStore,
        cases: Cases,
        rules: DetectorRules,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.store, self.cases, self.rules = store, cases, rules
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.detectors = detectors(rules)
        self.rebuild = Rebuild(self.detectors)
        self.fed = 0  # log entries read so far
        self.opened: set[str] = set()  # finding keys whose case exists (this process knows)

    async def feed(self) -> int:
        """Read the entries added since the last round; how many."""
        read = 0
        while True:
            rows = await log.read(self.store, self.fed, PAGE)
            if not rows:
                return read
            envelopes = [Envelope.FromString(r[3]) for r in rows]
            for env in envelopes:
                self.rebuild.add(env)
            self.fed = rows[-1][0] + 1
            read += len(rows)

    async def step(self) -> list[Finding]:
        """One round: read what is new, open a case for every finding not opened yet; the
        findings it opened cases for."""
        await self.feed()
        now = self.clock()
        found = await asyncio.to_thread(
            lambda: [f for d in self.detectors for f in d.findings(now)]
        )
        new = [f for f in sorted(found, key=lambda f: f.key) if f.key not in self.opened]
        for f in new:
            order_id = f.subject if f.subject_kind == "order" else ""
            await self.cases.open_finding(
                f.key, summary_of(f), subject=f"{f.subject_kind}:{f.subject}", order_id=order_id
            )
            self.opened.add(f.key)
            logger.warning("finding: %s", f.key, extra={"alert": ALERT, "detector": f.detector})
        return new

    async def loop(self, stop: asyncio.Event, every_s: float) -> None:
        """Run a round every ``every_s`` until ``stop``."""
        await every(
            stop, every_s, self.step, log=logger, failure="fraud detection failed", alert=ALERT
        )
