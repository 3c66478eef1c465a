"""The platform's topology, declared once: its processes, whom each calls over gRPC, whose
events each consumes over NATS, and who from outside may call it.

Everything else is derived from this module or tested against it, so a new call is one edit
here and every copy that disagrees fails a test:
- ``ServiceSpec.peers`` (services/kernel/app.py) and so the ``SUBSIDY_<PEER>_ADDR`` settings a
  service requires; at start-up the runner also refuses a service whose consumers subscribe to
  other producers than ``consumes`` declares (:func:`check_consumers`);
- the local stack's ports and per-service environment (subsidyctl/localstack.py) and the
  in-process platform (subsidyctl/inprocess.py);
- the Helm chart cannot import Python: tests/deploy/test_chart_topology.py renders it and checks
  that its settings and NetworkPolicies allow exactly these flows, no more and no fewer, and
  that the flow diagram in docs/architecture.md draws exactly them too.

Pure data and pure functions: no I/O, no imports from services.
"""

from __future__ import annotations

from dataclasses import dataclass

CATALOG = "catalog"
ELIGIBILITY = "eligibility"
LEDGER = "ledger"
AUDIT = "audit"
# A role, not a process: the provincial verification platform in production; locally, and in
# dev clusters that enable it, the simulator stands in for it.
IDENTITY_AUTHORITY = "identity_authority"
IDENTITY_SIMULATOR = "identity_sim"

# Callers from outside the platform, by role (the chart selects each with a values key).
PLATFORM = "platform"
AUDITOR = "auditor"


@dataclass(frozen=True)
class Service:
    """One of the platform's services (``python -m services.<name>``)."""

    name: str
    # The local stack serves gRPC on base port + offset and /metrics on + offset + 10.
    port_offset: int
    # Peers it calls over gRPC: other services, or IDENTITY_AUTHORITY.
    calls: tuple[str, ...] = ()
    # Services whose events it consumes (its durable consumers subscribe to their subjects).
    consumes: tuple[str, ...] = ()
    # Roles outside the platform that call it.
    clients: tuple[str, ...] = ()


# In start order: a service starts after the ones it calls (the in-process platform and the
# local stack start them in this order and stop them in reverse).
SERVICES: tuple[Service, ...] = (
    # Auditors reach every service: `subsidyctl audit verify` compares the log with each store
    # (EventLogService.ListEvents) and the ledger's figures.
    Service(CATALOG, 1, consumes=(LEDGER,), clients=(AUDITOR,)),
    Service(
        ELIGIBILITY,
        2,
        calls=(IDENTITY_AUTHORITY,),
        consumes=(CATALOG, LEDGER),
        clients=(PLATFORM, AUDITOR),
    ),
    # The ledger screens reservations against the risk rules and lists eligibility owns, which
    # it learns from eligibility's events.
    Service(
        LEDGER,
        3,
        calls=(CATALOG, ELIGIBILITY),
        consumes=(ELIGIBILITY,),
        clients=(PLATFORM, AUDITOR),
    ),
    # Platforms file and follow complaints (the audit service's supervision cases).
    Service(AUDIT, 4, consumes=(CATALOG, ELIGIBILITY, LEDGER, AUDIT), clients=(PLATFORM, AUDITOR)),
)
SERVICE_NAMES: tuple[str, ...] = tuple(s.name for s in SERVICES)
SIMULATOR_PORT_OFFSET = 5
METRICS_PORT_SHIFT = 10


def service(name: str) -> Service:
    """The declared service called ``name``; KeyError if there is none."""
    for s in SERVICES:
        if s.name == name:
            return s
    raise KeyError(name)


def peers(name: str) -> tuple[str, ...]:
    """The peers service ``name`` calls over gRPC (what its ``ServiceSpec.peers`` holds)."""
    return service(name).calls


def serving_process(peer: str) -> str:
    """The local process that answers calls to ``peer`` (the simulator for the authority)."""
    return IDENTITY_SIMULATOR if peer == IDENTITY_AUTHORITY else service(peer).name


def calls() -> frozenset[tuple[str, str]]:
    """Every gRPC flow inside the platform as (caller, peer)."""
    return frozenset((s.name, peer) for s in SERVICES for peer in s.calls)


def event_flows() -> frozenset[tuple[str, str]]:
    """Every NATS flow as (producer, consumer)."""
    return frozenset((producer, s.name) for s in SERVICES for producer in s.consumes)


def client_calls() -> frozenset[tuple[str, str]]:
    """Every call from outside the platform as (role, service)."""
    return frozenset((role, s.name) for s in SERVICES for role in s.clients)


def addr_variable(peer: str) -> str:
    """The setting that holds a peer's ``host:port``, e.g. ``SUBSIDY_CATALOG_ADDR``."""
    return f"SUBSIDY_{peer.upper()}_ADDR"


def local_port(name: str, base: int) -> int:
    """gRPC port of a service or of the simulator in a local stack on ``base``."""
    if name == IDENTITY_SIMULATOR:
        return base + SIMULATOR_PORT_OFFSET
    return base + service(name).port_offset


def local_metrics_port(name: str, base: int) -> int:
    """Prometheus port of a service in a local stack on ``base``."""
    return local_port(name, base) + METRICS_PORT_SHIFT


def subject_producer(subject: str) -> str | None:
    """The service whose events a NATS subject filter selects (``events.ledger.X`` → ledger);
    None for a filter that spans every producer (``events.>``)."""
    parts = subject.split(".")
    if len(parts) < 3 or parts[0] != "events" or parts[1] in {"*", ">"}:
        return None
    return parts[1]


def check_consumers(name: str, subjects: list[str]) -> None:
    """Raise ValueError unless the subjects ``name``'s consumers subscribe to cover exactly the
    producers its declaration says it consumes (a wildcard over every producer counts as all)."""
    declared = set(service(name).consumes)
    seen: set[str] = set()
    for subject in subjects:
        producer = subject_producer(subject)
        seen |= set(SERVICE_NAMES) if producer is None else {producer}
    if seen != declared:
        raise ValueError(
            f"{name} consumes events of {sorted(seen)} but the topology declares "
            f"{sorted(declared)} (services/kernel/topology.py)"
        )
