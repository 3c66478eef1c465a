"""The dashboard's reads: the services' own read APIs and the audit log, never their tables.

The monitor acts as one read-only identity (the demo auditor locally) and, once a second:
- follows the audit log (``GetEntries`` from where it stopped) into :class:`figures.LogFold`:
  which pools exist, their burn-down, reservations by outcome, claims per day and category,
  threshold alerts, and the policy what-if of every draft awaiting approval (the same entries
  feed :class:`services.audit.whatif.WhatIfFold`);
- asks the ledger for each pool's figures as they stand (``GetBudget``), catalog for the policy
  in force (``GetPolicy``: the daily quotas and the campaign's time zone, so "today" is the
  campaign's day), and every service whether its outbox relay is stuck (``GetOutboxStatus``);
- reads the consumers' lag from the NATS server's monitoring endpoint (``/jsz``), when one is
  configured: a durable consumer's name starts with its service's name.

Each read that fails is reported on the page (and the rest still shown), never raised: a
dashboard that dies when the ledger restarts tells an operator nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import grpc

from services.kernel import rpc, tls, topology
from services.kernel.bus import DLQ_STREAM
from services.kernel.contract.policy import Policy, policy_from_json
from subsidy.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    cases_pb2,
    cases_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    outbox_pb2,
    outbox_pb2_grpc,
)

from .figures import LogFold, burn_down, money, outcomes_json, percent_bp, yuan

PAGE = 1000  # GetEntries' largest page
MAX_PAGES_PER_CYCLE = 20  # a long log is caught up over several cycles, the page stays live
POLICY_EVERY_S = 10.0
CASES_SHOWN = 50  # the open cases listed, soonest deadline first (the count covers them all)


@dataclass(frozen=True)
class Endpoints:
    """Where the services answer (host:port each) and, optionally, the NATS monitoring URL."""

    services: Mapping[str, str]
    nats_monitor: str = ""


def _status(err: grpc.aio.AioRpcError) -> str:
    return f"{err.code().name}: {err.details() or ''}".strip()


class Monitor:
    """Keeps the dashboard's snapshot fresh; :meth:`wait_change` wakes the page's streams."""

    def __init__(
        self,
        endpoints: Endpoints,
        identity: tls.CertificateSource,
        *,
        pools: tuple[str, ...] = (),
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.endpoints = endpoints
        self.identity = identity
        self.clock = clock
        self.extra_pools = pools
        self.fold = LogFold()
        self.policy: Policy | None = None
        self._policy_at = -1e9
        self._channels = {
            name: rpc.channel(addr, identity, deadline_s=5.0)
            for name, addr in endpoints.services.items()
        }
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self._channels["ledger"])
        self.audit = audit_pb2_grpc.AuditServiceStub(self._channels["audit"])
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(self._channels["catalog"])
        self.cases = cases_pb2_grpc.CaseServiceStub(self._channels["audit"])  # audit serves it
        self.outboxes = {
            name: outbox_pb2_grpc.OutboxServiceStub(ch)
            for name, ch in self._channels.items()
            if name in topology.SERVICE_NAMES
        }
        self.snapshot: dict[str, Any] = {"version": 0, "loading": True}
        self._last_pools: dict[str, dict[str, Any]] = {}
        self._body = ""
        self._changed = asyncio.Condition()
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        for ch in self._channels.values():
            await ch.close()

    # -- the loop --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        """Refresh until ``stop`` is set."""
        while not stop.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    async def wait_change(self, version: int, within_s: float) -> dict[str, Any]:
        """The snapshot once its version differs from ``version`` (or after ``within_s``)."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.snapshot["version"] != version), within_s
                )
        return self.snapshot

    async def refresh(self) -> dict[str, Any]:
        """One round of reads; the snapshot's version moves on only when something changed."""
        errors: list[str] = []
        log = await self._follow_log(errors)
        await self._refresh_policy(errors)
        pools = await self._pools(errors)
        outboxes = await self._outboxes(errors)
        lag = await self._lag(errors)
        body = {
            "campaign": self._campaign(),
            "pools": pools,
            "claims": self._claims(),
            "alerts": self._alerts(outboxes, lag),
            "lag": lag.get("services", []),
            "lag_note": lag.get("note", ""),
            "cases": await self._cases(errors),
            "whatif": self.fold.whatif_panels(),  # from the entries already folded above
            "log": log,
            "errors": errors,
        }
        text = json.dumps(body, sort_keys=True, ensure_ascii=False)
        if text != self._body:
            self._body = text
            async with self._changed:
                self.snapshot = {
                    **body,
                    "version": self.snapshot["version"] + 1,
                    "updated_at": self.clock().isoformat(timespec="seconds"),
                }
                self._changed.notify_all()
        return self.snapshot

    # -- the reads -------------------------------------------------------------------------
    async def _cases(self, errors: list[str]) -> dict[str, Any]:
        """The cases not yet resolved, soonest deadline first (ids, kinds, deadlines only: no
        complaint text, no names)."""
        try:
            found = [
                c
                for status in ("OPEN", "AWAITING_APPROVAL")
                for c in (
                    await self.cases.ListCases(cases_pb2.ListCasesRequest(status=status))
                ).cases
            ]
        except grpc.aio.AioRpcError as err:
            errors.append(f"cases: {_status(err)}")
            return {"available": False, "note": "cases could not be read", "open": 0, "rows": []}
        found.sort(key=lambda c: (c.deadline.ToDatetime(), c.case_id))
        now = self.clock()
        rows = [
            {
                "case_id": c.case_id,
                "kind": c.kind,
                "priority": c.priority,
                "status": c.status,
                "deadline": c.deadline.ToDatetime(tzinfo=dt.UTC).isoformat(timespec="minutes"),
                "overdue": bool(c.overdue) or c.deadline.ToDatetime(tzinfo=dt.UTC) < now,
            }
            for c in found[:CASES_SHOWN]
        ]
        return {
            "available": True,
            "note": "" if found else "no open case",
            "open": len(found),
            "overdue": sum(1 for r in rows if r["overdue"]),
            "rows": rows,
        }

    async def _follow_log(self, errors: list[str]) -> dict[str, int]:
        try:
            info = await self.audit.GetLogInfo(audit_pb2.GetLogInfoRequest())
            for _ in range(MAX_PAGES_PER_CYCLE):
                if self.fold.seen >= info.size:
                    break
                page = await self.audit.GetEntries(
                    audit_pb2.GetEntriesRequest(start=self.fold.seen, limit=PAGE)
                )
                if not page.entries:
                    break
                for entry in page.entries:
                    self.fold.add(entry.envelope)
        except grpc.aio.AioRpcError as err:
            errors.append(f"audit log: {_status(err)}")
            return {"size": self.fold.seen, "folded": self.fold.seen}
        return {"size": int(info.size), "folded": self.fold.seen}

    async def _refresh_policy(self, errors: list[str]) -> None:
        now = asyncio.get_running_loop().time()
        if self.policy is not None and now - self._policy_at < POLICY_EVERY_S:
            return
        try:
            answer = await self.catalog.GetPolicy(catalog_pb2.GetPolicyRequest())
            self.policy = policy_from_json(answer.policy_json)
            self._policy_at = now
        except grpc.aio.AioRpcError as err:
            errors.append(f"catalog policy: {_status(err)}")
        except ValueError as err:
            errors.append(f"catalog policy: unreadable ({type(err).__name__})")

    async def _pools(self, errors: list[str]) -> list[dict[str, Any]]:
        out = []
        for pool_id in sorted({*self.fold.pools, *self.extra_pools}):
            try:
                b = await self.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    errors.append(f"ledger GetBudget {pool_id}: {_status(err)}")
                    # The last figures the ledger gave, marked stale, rather than no pool at all.
                    if pool_id in self._last_pools:
                        out.append({**self._last_pools[pool_id], "stale": True})
                continue
            trail = self.fold.pools.get(pool_id)
            out.append(
                {
                    "pool_id": b.pool_id,
                    "stale": False,
                    "policy_version": b.policy_version,
                    "split": b.split,
                    **{k: money(getattr(b, f"{k}_fen")) for k in _BUCKETS},
                    "spent_share": _share(b.spent_fen, b.funded_fen),
                    "sources": [
                        {"source": s.source, **{k: money(getattr(s, f"{k}_fen")) for k in _BUCKETS}}
                        for s in b.sources
                    ],
                    "categories": [
                        {
                            "category": c.category,
                            "name": self._category_name(c.category),
                            "reserved": money(c.reserved_fen),
                            "spent": money(c.spent_fen),
                            "sub_budget": (
                                money(c.sub_budget_fen) if c.HasField("sub_budget_fen") else None
                            ),
                        }
                        for c in b.categories
                    ],
                    "thresholds": [percent_bp(bp) for bp in b.alert_thresholds_bp],
                    "reached": [
                        {
                            "category": a.category,
                            "threshold": percent_bp(a.threshold_bp),
                            "at": a.reached_at.ToDatetime(dt.UTC).isoformat(timespec="seconds"),
                        }
                        for a in b.alerts
                    ],
                    "outcomes": outcomes_json(self.fold, pool_id),
                    "burn_down": burn_down(trail) if trail is not None else None,
                }
            )
            self._last_pools[pool_id] = out[-1]
        return out

    async def _outboxes(self, errors: list[str]) -> dict[str, str]:
        stuck = {}
        for name, stub in self.outboxes.items():
            try:
                status = await stub.GetOutboxStatus(outbox_pb2.GetOutboxStatusRequest())
            except grpc.aio.AioRpcError as err:
                errors.append(f"{name} outbox: {_status(err)}")
                continue
            if status.stuck_event_id:
                stuck[name] = f"{status.stuck_event_id} ({status.stuck_reason})"
        return stuck

    async def _lag(self, errors: list[str]) -> dict[str, Any]:
        if not self.endpoints.nats_monitor:
            return {"note": "no NATS monitoring endpoint configured (--nats-monitor)"}
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        url = f"{self.endpoints.nats_monitor}/jsz?accounts=true&streams=true&consumers=true"
        try:
            async with self._http.get(url) as response:
                jsz = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            errors.append(f"NATS monitoring: {type(exc).__name__}")
            return {"note": "NATS monitoring unreachable"}
        return consumer_lag(jsz)

    # -- shaping ---------------------------------------------------------------------------
    def _today(self) -> dt.date:
        zone = ZoneInfo(self.policy.claim_window.timezone) if self.policy else dt.UTC
        return self.clock().astimezone(zone).date()

    def _campaign(self) -> dict[str, Any]:
        p = self.policy
        return {
            "policy_version": p.version if p else "",
            "name": p.campaign.name if p else "",
            "timezone": p.claim_window.timezone if p else "UTC",
            "today": self._today().isoformat(),
        }

    def _category_name(self, code: str) -> str:
        rule = self.policy.category(code) if self.policy else None
        return rule.name_en if rule else code

    def _claims(self) -> list[dict[str, Any]]:
        today = self._today().isoformat()
        issued = {cat: n for (day, cat), n in self.fold.claims.items() if day == today}
        rules = self.policy.categories if self.policy else ()
        rows = [
            {
                "category": r.code,
                "name": r.name_en,
                "issued": issued.get(r.code, 0),
                "quota": r.daily_quota,
            }
            for r in rules
        ]
        known = {r.code for r in rules}
        rows += [
            {"category": c, "name": c, "issued": n, "quota": None}
            for c, n in sorted(issued.items())
            if c not in known
        ]
        return rows

    def _alerts(self, stuck: Mapping[str, str], lag: Mapping[str, Any]) -> list[dict[str, str]]:
        now = self.clock().isoformat(timespec="seconds")
        alerts = [a.as_json() for a in reversed(self.fold.alerts)]
        for service, what in sorted(stuck.items()):
            alerts.insert(
                0, {"at": now, "kind": "outbox stuck", "text": f"{service}: {what}", "pool_id": ""}
            )
        dead = int(lag.get("dead_lettered", 0))
        if dead:
            alerts.insert(
                0,
                {
                    "at": now,
                    "kind": "dead letters",
                    "text": f"{dead} event(s) in the dead-letter stream",
                    "pool_id": "",
                },
            )
        return alerts


_BUCKETS = ("funded", "available", "reserved", "spent", "scheduled")


def _share(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a percentage with one decimal, in integers (floored)."""
    if whole <= 0:
        return "0.0%"
    tenths = part * 1000 // whole
    return f"{tenths // 10}.{tenths % 10}%"


def consumer_lag(jsz: Mapping[str, Any]) -> dict[str, Any]:
    """Each service's durable consumers with what they have not handled yet, from the NATS
    server's ``/jsz?accounts=true&streams=true&consumers=true`` answer; and how many events
    sit in the dead-letter stream."""
    by_service: dict[str, list[dict[str, Any]]] = {s: [] for s in topology.SERVICE_NAMES}
    dead = 0
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            if stream.get("name") == DLQ_STREAM:
                dead += int((stream.get("state") or {}).get("messages", 0))
            for consumer in stream.get("consumer_detail") or []:
                name = str(consumer.get("name", ""))
                service = name.split("-", 1)[0]
                if service not in by_service:
                    continue
                by_service[service].append(
                    {
                        "consumer": name,
                        "pending": int(consumer.get("num_pending", 0)),
                        "unacked": int(consumer.get("num_ack_pending", 0)),
                        "redelivered": int(consumer.get("num_redelivered", 0)),
                    }
                )
    services = [
        {
            "service": service,
            "lag": sum(c["pending"] + c["unacked"] for c in consumers),
            "consumers": sorted(consumers, key=lambda c: str(c["consumer"])),
        }
        for service, consumers in by_service.items()
        if consumers or topology.service(service).consumes
    ]
    return {"services": services, "dead_lettered": dead}


__all__ = ["Endpoints", "Monitor", "consumer_lag", "yuan"]
