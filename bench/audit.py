"""The audit log at a million events: ingest into the Merkle tree, and ``audit verify``.

    python -m bench.audit [--events 1000000]

The whole local stack runs (each service its own process, real PostgreSQL, NATS and OpenBao).
The events are **synthesised straight into the audit service's store**: rows of its entries
table with the leaf and chain hashes its consumer computes, in one COPY, because publishing a
million events through the services would measure the checkout path, not the log. They are
what a campaign writes: a funded pool, then per order a registration, a claim, a lock, a
reservation, a capture and the qualification used.

- **append**: the consumer's own write (one transaction per event: the handled mark and the
  entry), for a few thousand events, for scale;
- **ingest**: from the commit of the synthesised entries until the audit service's background
  loop has integrated every one into the tree (nodes stored, tree head advanced): events/s;
- **verify**: the auditor's check of the whole log, in this process over gRPC against the
  running audit service, exactly as ``subsidyctl audit verify`` runs it (a fresh signed
  checkpoint and its Ed25519 signature, every entry fetched and its leaf and the root
  recomputed, the hash chain, 16 random inclusion proofs, the consistency proof from a trusted
  checkpoint taken at a tenth of the log, and every total rebuilt from the events), without
  the cross-check against the services' stores and their live figures, which hold none of
  these events.

Results go to bench/results/audit.json; docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.common import RESULTS
from services.audit import log
from services.audit.domain import chain_hash, leaf_hash
from services.audit.verify import Trusted
from services.kernel import rpc, tls
from services.kernel.contract.checkpoint import VerifierKey
from services.kernel.events import Context, new_envelope, service_actor
from services.kernel.eventstore import EventStore, make_engine
from subsidy.v1 import audit_pb2, audit_pb2_grpc
from subsidy.v1 import events_pb2 as ev
from subsidyctl.cli.audit import Sources, audit_log, keys_from_vault
from subsidyctl.localstack import LocalStack, Ports, free_base
from subsidyctl.stack.certs import AUDITOR_DEMO

POOLS = 8
IDLE_S = 5.0  # seconds PostgreSQL's idle CPU is measured over, before verify
DETECTION_OFF_S = 10**7  # the detectors' interval: their first round (the empty log) only
LEDGER = Context(service_actor("ledger"))
ELIGIBILITY = Context(service_actor("eligibility"))


class Campaign:
    """The events of a campaign, as the services' stores would hold them, continued across
    calls (streams and versions go on where the last call stopped)."""

    def __init__(self) -> None:
        self.versions = dict.fromkeys(range(POOLS), 0)
        self.order = 0
        self.pending: list[bytes] = []  # the rest of an order the last call cut in two

    def _pool(self, p: int, event: Any) -> bytes:
        self.versions[p] += 1
        return new_envelope(
            "ledger", f"budget-pool/bench-{p}", event, LEDGER, version=self.versions[p]
        ).SerializeToString(deterministic=True)

    def _order(self) -> list[bytes]:
        """A registration, a claim, a lock, a reservation, a capture, the qualification used."""
        self.order += 1
        n = self.order
        p, c, q, o = n % POOLS, f"c-{n}", f"q-{n}", f"o-{n}"
        consumer, by_order = (
            f"consumer/{c}",
            Context(service_actor("eligibility"), correlation_id=o),
        )

        def mine(version: int, event: Any, ctx: Context = ELIGIBILITY) -> bytes:
            return new_envelope(
                "eligibility", consumer, event, ctx, version=version
            ).SerializeToString(deterministic=True)

        return [
            mine(1, ev.ConsumerRegistered(
                consumer_id=c, id_number_index=f"bi-{n:012d}", platform_id="jd"
            )),
            mine(2, ev.QualificationClaimed(
                qualification_id=q, consumer_id=c, category="phone", quota_day="2026-12-01"
            )),
            mine(3, ev.QualificationLocked(qualification_id=q, order_id=o), by_order),
            self._pool(p, ev.SubsidyReserved(
                order_id=o, pool_id=f"bench-{p}", platform_id="jd", consumer_id=c,
                qualification_id=q, sku="bench-phone", merchant_id="bench-m", category="phone",
                unit_price_fen=300_000, subsidy_fen=45_000,
            )),
            self._pool(p, ev.SubsidyCaptured(order_id=o, pool_id=f"bench-{p}", subsidy_fen=45_000)),
            mine(4, ev.QualificationUsed(qualification_id=q, order_id=o), by_order),
        ]  # fmt: skip

    def events(self, n: int) -> Iterator[bytes]:
        """The next ``n`` events (the pools are funded first)."""
        made = 0
        if self.order == 0 and not any(self.versions.values()):
            for p in range(POOLS):
                yield self._pool(p, ev.BudgetFunded(pool_id=f"bench-{p}", amount_fen=10**14))
                made += 1
        while made < n:
            if not self.pending:
                self.pending = self._order()
            yield self.pending.pop(0)
            made += 1


def synthesise(conninfo: str, campaign: Campaign, n: int) -> tuple[int, float]:
    """COPY ``n`` entries after the log's last one, chained, under the head's lock (the
    consumer waits); returns the log's size after and the seconds it took."""
    t0 = time.perf_counter()
    with psycopg.connect(conninfo) as conn, conn.transaction():
        size, head = conn.execute(
            "SELECT size, chain_hash FROM audit_head WHERE id = 1 FOR UPDATE"
        ).fetchone() or (0, b"")
        head = bytes(head)
        with conn.cursor().copy(
            "COPY audit_entries (idx, event_id, service, event_type, leaf_hash, chain_hash,"
            " envelope) FROM STDIN"
        ) as copy:
            from services.kernel.events import Envelope

            for i, data in enumerate(campaign.events(n)):
                env = Envelope.FromString(data)
                leaf = leaf_hash(data)
                head = chain_hash(head, leaf)
                copy.write_row(
                    (size + i, env.event_id, env.service, env.event_type, leaf, head, data)
                )
        conn.execute(
            "UPDATE audit_head SET size = %s, chain_hash = %s WHERE id = 1", (size + n, head)
        )
    return size + n, time.perf_counter() - t0


async def appends(url: str, n: int) -> float:
    """Events/s through the consumer's write (mark handled and append, one transaction each)."""
    store = EventStore(make_engine(url, pool_size=2))
    try:
        envs = [
            new_envelope(
                "ledger", f"bench-append/{i}", ev.PoolAssigned(pool_id="x"), LEDGER, version=1
            )
            for i in range(n)
        ]
        t0 = time.perf_counter()
        for env in envs:
            async with store.transaction() as tx:
                if await tx.mark_handled("audit-log", env.event_id):
                    await log.append(tx, env)
        return n / (time.perf_counter() - t0)
    finally:
        await store.engine.dispose()


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_s(data_dir: Path) -> float:
    """CPU seconds of the PostgreSQL server so far: the postmaster, its live backends, and
    the backends that have ended (counted in the postmaster's children's times)."""
    server = psutil.Process(int((data_dir / "postmaster.pid").read_text().split()[0]))
    own = server.cpu_times()
    total = own.user + own.system + own.children_user + own.children_system
    for child in server.children():
        try:
            times = child.cpu_times()
        except psutil.Error:  # ended meanwhile: counted in the postmaster's children's times
            continue
        total += times.user + times.system
    return total


async def wait_integrated(audit: audit_pb2_grpc.AuditServiceAsyncStub, size: int) -> float:
    """Seconds until the tree holds ``size`` entries (polled: the service has no event for it)."""
    t0 = time.perf_counter()
    while (await audit.GetLogInfo(audit_pb2.GetLogInfoRequest())).tree_size < size:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    return time.perf_counter() - t0


class Profiler:
    """py-spy sampling the auditor (this process) and the audit service during ``verify``
    (``--profile DIR``): collapsed stacks in ``DIR/verify-<who>.txt`` and each one's top
    functions by own time in the results. py-spy is pip-installable; a run without
    ``--profile`` does not need it."""

    def __init__(self, directory: Path | None, pids: dict[str, int]) -> None:
        self.directory = directory
        self.pids = dict(pids)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._watch: threading.Thread | None = None

    def _spy(self, who: str, pid: int) -> None:
        assert self.directory is not None
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        # --gil: only samples holding the GIL, i.e. the CPU the process itself spends;
        # --nonblocking: the sampled process is never paused (the wall time stays honest).
        command = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
        out = self.directory / f"verify-{who}.txt"
        self._procs.append(
            subprocess.Popen(
                [*command, "--gil", "--nonblocking", "-o", str(out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def _spy_replay(self) -> None:
        """The auditor's second process (``services.audit.replay``), once it has started."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for child in psutil.Process().children():
                try:
                    if "services.audit.replay" in child.cmdline():
                        self._spy("auditor-replay", child.pid)
                        self.pids["auditor-replay"] = child.pid
                        return
                except psutil.Error:
                    continue
            time.sleep(0.05)

    def start(self) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for who, pid in list(self.pids.items()):
            self._spy(who, pid)
        self._watch = threading.Thread(target=self._spy_replay, daemon=True)
        self._watch.start()
        time.sleep(0.5)  # attached before the phase starts

    def stop(self) -> dict[str, list[tuple[str, float]]]:
        """Stop sampling; each process's top functions (share of its samples, own time)."""
        if self._watch is not None:
            self._watch.join()
        for proc in self._procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            proc.wait(30)
        self._procs = []
        if self.directory is None:
            return {}
        return {who: top_functions(self.directory / f"verify-{who}.txt") for who in self.pids}


def top_functions(path: Path, n: int = 12) -> list[tuple[str, float]]:
    """The functions that spend the most samples themselves (the innermost frame, its line
    numbers folded into the function) in a py-spy raw file (``frame;frame;... count`` a line),
    as shares of all samples; the first row is the number of samples (200 a second)."""
    own: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            own[re.sub(r":\d+\)$", ")", stack.rsplit(";", 1)[-1])] += int(count)
    total = sum(own.values())
    rows = [(frame, round(100 * c / (total or 1), 1)) for frame, c in own.most_common(n)]
    return [("samples", float(total)), *rows]


async def run(events: int, root: Path, profile: Path | None = None) -> dict[str, Any]:
    # The fraud detectors' rounds over the whole log would run during the measured phases
    # (each is a fold of every event) and compete with them for the two cores: off here.
    stack = LocalStack(
        root,
        Ports(free_base()),
        durable=False,
        log=io.StringIO(),
        settings_overrides={"SUBSIDY_DETECT_EVERY_S": str(DETECTION_OFF_S)},
    )
    stack.start()
    try:
        assert stack.pg is not None and stack.bao is not None
        who = tls.FileCertificates(stack.identity(AUDITOR_DEMO))
        channel = rpc.channel(stack.endpoint("audit"), who, deadline_s=60)
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        origin = "subsidy.local/audit"
        vkeys = keys_from_vault(stack.bao.addr, stack.bao.token, "transit", origin)

        async def keys(_: str) -> list[VerifierKey]:
            return vkeys

        conninfo = stack.pg.conninfo("audit")
        append_rate = await appends(stack.pg.url("audit"), 3000)
        # A tenth first: the checkpoint an auditor trusted last time.
        first = events // 10
        campaign = Campaign()
        size, _ = await asyncio.to_thread(synthesise, conninfo, campaign, first)
        await wait_integrated(audit, size)
        warm, state = await audit_log(Sources(audit), keys=keys, sample=0)
        assert warm.checkpoint is not None and warm.ok, [p.message for p in warm.problems]
        trusted: Trusted = state.trusted_state(warm.note, warm.checkpoint)
        del state
        # The rest: ingest into the tree, then the whole log verified.
        size, copy_s = await asyncio.to_thread(synthesise, conninfo, campaign, events - first)
        ingest_s = await wait_integrated(audit, size)
        server = stack.pid("audit")
        # PostgreSQL's CPU while nothing is asked of the log (the other services' background
        # loops poll their stores): what of its CPU during verify is not verify's.
        idle0 = postgres_cpu_s(stack.pg.data_dir)
        await asyncio.sleep(IDLE_S)
        pg_idle_per_s = (postgres_cpu_s(stack.pg.data_dir) - idle0) / IDLE_S
        profiler = Profiler(profile, {"auditor": os.getpid(), "audit-service": server})
        profiler.start()
        cpu0, served0 = resource.getrusage(resource.RUSAGE_SELF), process_cpu_s(server)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        pg0, load0 = postgres_cpu_s(stack.pg.data_dir), os.getloadavg()
        t0 = time.perf_counter()
        found, state = await audit_log(Sources(audit), keys=keys, trusted=trusted, sample=16)
        verify_s = time.perf_counter() - t0
        cpu1, served1 = resource.getrusage(resource.RUSAGE_SELF), process_cpu_s(server)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        pg1, load1 = postgres_cpu_s(stack.pg.data_dir), os.getloadavg()
        top = profiler.stop()
        await channel.close()
        problems = [p.message for p in found.problems]
        assert found.ok and found.signature_ok and found.consistent_with_trusted, problems
        assert state.size == size and found.proofs_checked >= 3
        pools = found.pools
        spent = sum(p["spent_fen"] for p in pools.values())
        return {
            "events": size,
            "synthesised": events,
            "append_per_s": round(append_rate, 1),
            "copy_s": round(copy_s, 1),
            "ingest_events": events - first,
            "ingest_s": round(ingest_s, 1),
            "ingest_per_s": round((events - first) / ingest_s, 1),
            "verify_s": round(verify_s, 1),
            "verify_per_s": round(size / verify_s, 1),
            "verify_cpu_s": round(
                (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 1
            ),
            # the auditor's second process (parsing and folding), waited for at the end
            "verify_replay_cpu_s": round(
                (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime), 1
            ),
            "audit_service_cpu_s": round(served1 - served0, 1),
            "postgres_cpu_s": round(pg1 - pg0, 1),
            "postgres_idle_cpu_s": round(pg_idle_per_s * verify_s, 1),  # of which, at idle rate
            "load_average_before_after": [round(load0[0], 1), round(load1[0], 1)],
            "proofs_checked": found.proofs_checked,
            "totals": {k: v for k, v in found.totals_compared.items()},
            "pools": len(pools),
            "spent_fen": spent,
            "targets": {"ingest_per_s": 3000, "verify_per_s": 100_000},
            "profile": top,
        }
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--profile", type=Path, help="py-spy the auditor and the audit service during verify"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        result = asyncio.run(run(args.events, Path(tmp), args.profile))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"append (consumer's write)  {result['append_per_s']:>10.1f} events/s")
    print(
        f"ingest into the tree       {result['ingest_per_s']:>10.1f} events/s"
        f"  ({result['ingest_events']} in {result['ingest_s']} s; target 3,000)"
    )
    print(
        f"audit verify               {result['verify_per_s']:>10.1f} events/s"
        f"  ({result['events']} in {result['verify_s']} s; target 100,000)"
    )
    print(
        f"verify CPU s: auditor {result['verify_cpu_s']}, its replay process"
        f" {result['verify_replay_cpu_s']}, audit service {result['audit_service_cpu_s']},"
        f" postgres {result['postgres_cpu_s']} (at its idle rate"
        f" {result['postgres_idle_cpu_s']}); load average"
        f" {result['load_average_before_after'][0]} -> {result['load_average_before_after'][1]}"
    )
    for who, rows in result["profile"].items():
        print(f"top functions (own time) of {who}:")
        for frame, share in rows:
            print(f"  {share:7.1f} {'' if frame == 'samples' else '%'}  {frame}")


if __name__ == "__main__":
    main()
