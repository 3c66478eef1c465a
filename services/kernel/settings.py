"""Every environment variable a process of the platform reads, and nothing else reads them.

(Longer than the project's usual 450 lines on purpose: it is the one declaration of every
variable, which the readers, the chart test and the docs' settings table all derive from;
splitting it would make two places to look.)

A service reads :class:`Settings`, the identity simulator :class:`SimulatorSettings`, the
stand-alone outbox relay :class:`RelaySettings`. Each field names its variable in its metadata
(:func:`variable`), so the one declaration serves the reader, the chart test that derives the
variables a deployment must set (tests/deploy/test_chart_settings.py) and the check of the
settings table in docs/operations.md. A missing required variable stops the process at start-up
with a message naming it; nothing starts half-configured.

Why not pydantic-settings: what is hand-written here is the part it would not remove. The
peers' variables depend on the service (the topology), the Vault token may come from a file or
be replaced by a Kubernetes role, the database password is spliced into the URL from a file,
and the fail-fast messages operators and tests rely on ("missing required environment variable
X", "X must be an integer, got ...") would need a translation layer over its ValidationError.
What remains (read a string, an int, a path) is a few lines, without a new dependency.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from . import topology


class SettingsError(RuntimeError):
    """A required setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, what it means (the docs' wording), whether a
    process refuses to start without it, and whether every deployment sets it (the chart must
    write it into each service's settings even when it is optional for a local run)."""

    name: str
    meaning: str
    required: bool = False
    deployed: bool = False


# Variables the libraries the platform configures read by themselves (the OpenTelemetry SDK,
# libpq, requests under the Vault client); listed so a deployment may set them and the docs
# explain them, never read by the platform's own code.
LIBRARY_VARIABLES: tuple[Variable, ...] = (
    Variable(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "where OTLP traces go; read by the OpenTelemetry SDK",
        deployed=True,
    ),
    Variable(
        "OTEL_RESOURCE_ATTRIBUTES",
        "extra attributes of every span; read by the OpenTelemetry SDK",
    ),
    Variable("PGSSLROOTCERT", "CA bundle PostgreSQL's certificate is verified with; read by libpq"),
    Variable(
        "REQUESTS_CA_BUNDLE",
        "CA bundle Vault's certificate is verified with; read by requests (the Vault client)",
    ),
)

_SPECIAL = "special"  # metadata flag: the field is read by hand in from_env, not generically


def variable(
    name: str,
    meaning: str,
    *,
    default: Any = dataclasses.MISSING,
    required: bool = False,
    deployed: bool = False,
    also: tuple[Variable, ...] = (),
    special: bool = False,
) -> Any:
    """A settings field read from the variable ``name``; ``also`` lists further variables the
    same field is read from (a ``*_FILE`` form), ``special`` that from_env reads it by hand."""
    metadata: dict[str, object] = {
        "variables": (Variable(name, meaning, required, deployed), *also)
    }
    if special:
        metadata[_SPECIAL] = True
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def environment_with(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``extra`` added: the environment of a process it starts
    (a supervisor's workers), so that reading the environment stays in this module."""
    return {**os.environ, **extra}


def _get(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name, default)
    if value is None or value == "":
        raise SettingsError(f"missing required environment variable {name}")
    return value


def _with_password(url: str, password: str) -> str:
    """``url`` with ``password`` for its user, percent-encoded (a password may hold any of
    ``@ / : # ?``), unless the URL names no user or already carries a password."""
    # Here, not at the top: the command line imports these settings, and SQLAlchemy is a
    # few hundred milliseconds of every command's start-up that only services need.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        # Never echo the URL: it may carry credentials.
        raise SettingsError("SUBSIDY_DATABASE_URL is not a valid database URL") from None
    if parsed.username is None or parsed.password is not None:
        return url
    return parsed.set(password=password).render_as_string(hide_password=False)


def _database_url(env: Mapping[str, str]) -> str:
    url = _get(env, "SUBSIDY_DATABASE_URL")
    password_file = env.get("SUBSIDY_DATABASE_PASSWORD_FILE")
    if password_file:
        url = _with_password(url, Path(password_file).read_text().strip())
    return url


def _migration_database_url(env: Mapping[str, str]) -> str | None:
    """The migration role's URL with its password file spliced in, or None (unset: the
    service migrates with its own URL)."""
    url = env.get("SUBSIDY_MIGRATION_DATABASE_URL") or None
    password_file = env.get("SUBSIDY_MIGRATION_DATABASE_PASSWORD_FILE")
    if url is not None and password_file:
        try:
            url = _with_password(url, Path(password_file).read_text().strip())
        except SettingsError:
            raise SettingsError(
                "SUBSIDY_MIGRATION_DATABASE_URL is not a valid database URL"
            ) from None
    return url


def _parse(name: str, raw: str, kind: Any) -> Any:
    """``raw`` as the field's type: int, float, Path or str (optional or not)."""
    args = set(typing.get_args(kind)) - {type(None)}
    base = next(iter(args)) if args else kind
    if base is int or base is float:
        try:
            return base(raw)
        except ValueError:
            word = "an integer" if base is int else "a number"
            raise SettingsError(f"{name} must be {word}, got {raw!r}") from None
    if base is Path:
        return Path(raw)
    return raw


_DATABASE_PASSWORD_FILE = Variable(
    "SUBSIDY_DATABASE_PASSWORD_FILE",
    "file holding the password alone; the chart points it at the Vault Agent's "
    "`/vault/secrets/db-password`",
    deployed=True,
)
_DATABASE_URL_MEANING = (
    "`postgresql+psycopg://USER@HOST:PORT/DBNAME?sslmode=...`, no password (required)"
)


# Fields more than one kind of process reads: a function each, since a dataclass field object
# belongs to one class.
def _grpc_listen() -> Any:
    return variable(
        "SUBSIDY_GRPC_LISTEN",
        "gRPC listen address, e.g. `0.0.0.0:50051` (required)",
        required=True,
        deployed=True,
    )


def _database_url_field() -> Any:
    return variable(
        "SUBSIDY_DATABASE_URL",
        _DATABASE_URL_MEANING,
        required=True,
        deployed=True,
        also=(_DATABASE_PASSWORD_FILE,),
        special=True,
    )


def _nats_url() -> Any:
    return variable(
        "SUBSIDY_NATS_URL",
        "NATS URL, TLS only, e.g. `tls://nats.nats.svc:4222` (required)",
        required=True,
        deployed=True,
    )


def _nats_ca_file() -> Any:
    return variable(
        "SUBSIDY_NATS_CA_FILE",
        "CA bundle NATS's server certificate is verified with; default, for a service, the "
        "campaign CA of its own certificate (for the relay, the system's trust store)",
        default=None,
    )


def _tls_source() -> Any:
    return variable(
        "SUBSIDY_TLS_SOURCE",
        "where this process's certificate comes from: `vault` (it asks Vault's PKI engine and "
        "renews it itself; local stack) or `files` (`tls.crt`, `tls.key`, `ca.crt` in "
        "SUBSIDY_TLS_DIR, kept fresh by Vault Agent or cert-manager; the chart) (required)",
        required=True,
        deployed=True,
    )


def _tls_dir() -> Any:
    return variable(
        "SUBSIDY_TLS_DIR",
        "directory of `tls.crt`, `tls.key` and `ca.crt` when SUBSIDY_TLS_SOURCE is `files`",
        default=None,
        deployed=True,
    )


def _tls_names() -> Any:
    return variable(
        "SUBSIDY_TLS_SERVER_NAMES",
        "comma-separated DNS names and IP addresses a Vault-issued server certificate covers, "
        "default `localhost,127.0.0.1`",
        default="localhost,127.0.0.1",
    )


def _cert_ttl() -> Any:
    return variable(
        "SUBSIDY_CERT_TTL",
        "lifetime of a Vault-issued certificate (renewed at two thirds), default `1h`",
        default="1h",
    )


def _reflection() -> Any:
    return variable(
        "SUBSIDY_GRPC_REFLECTION",
        "`on` (default) or `off`: gRPC server reflection; production values turn it off",
        default="on",
        deployed=True,
    )


@dataclass(frozen=True, kw_only=True)
class ProcessSettings:
    """What every process of the platform reads: how it logs and traces."""

    log_level: str = variable(
        "SUBSIDY_LOG_LEVEL",
        "`DEBUG`, `INFO` (default), `WARNING`, `ERROR`",
        default="INFO",
        deployed=True,
    )
    # variable() returns a dataclasses.field, like field() itself (RUF009 cannot tell).
    log_file: Path | None = variable(  # noqa: RUF009
        "SUBSIDY_LOG_FILE", "write the JSON log here instead of stderr (local stack)", default=None
    )
    trace_file: Path | None = variable(  # noqa: RUF009
        "SUBSIDY_TRACE_FILE", "also write every span as a JSON line (local stack)", default=None
    )
    otel_service_name: str | None = variable(
        "OTEL_SERVICE_NAME", "from the pod label `app.kubernetes.io/name`", default=None
    )
    otel_traces_exporter: str = variable(
        "OTEL_TRACES_EXPORTER",
        "`otlp`, `console` or `none` (default): where spans go",
        default="none",
        deployed=True,
    )
    otel_traces_sampler: str = variable(
        "OTEL_TRACES_SAMPLER",
        "which traces are kept: `parentbased_always_on` (default: all), "
        "`parentbased_traceidratio` (production: a share of new traces, and every call whose "
        "caller kept its trace), `parentbased_always_off`, `always_on`, `always_off`, "
        "`traceidratio`",
        default="parentbased_always_on",
    )
    otel_traces_sampler_arg: float | None = variable(
        "OTEL_TRACES_SAMPLER_ARG",
        "the share of new traces a `*traceidratio` sampler keeps, 0 to 1 (default 1)",
        default=None,
    )

    # The name a process logs and traces under when OTEL_SERVICE_NAME does not say.
    process: ClassVar[str] = ""

    def __post_init__(self) -> None:
        # An unknown sampler or a ratio outside 0..1 stops the process at start, not at its
        # first span (services.kernel.telemetry.sampler builds what the names say).
        from .telemetry import sampler

        try:
            sampler(self.otel_traces_sampler, self.otel_traces_sampler_arg)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    @classmethod
    def variables(cls) -> tuple[Variable, ...]:
        """Every variable this kind of process reads, in declaration order."""
        found: list[Variable] = []
        for f in dataclasses.fields(cls):
            found += f.metadata.get("variables", ())
        return tuple(found)

    @classmethod
    def _read_plain(cls, env: Mapping[str, str]) -> dict[str, Any]:
        """Every field with a variable that from_env does not read by hand."""
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if "variables" not in f.metadata or f.metadata.get(_SPECIAL):
                continue
            var: Variable = f.metadata["variables"][0]
            raw = env.get(var.name)
            if var.required:
                values[f.name] = _parse(var.name, _get(env, var.name), hints[f.name])
            elif raw:
                values[f.name] = _parse(var.name, raw, hints[f.name])
        return values


@dataclass(frozen=True, kw_only=True)
class SimulatorSettings(ProcessSettings):
    """The identity-authority simulator's settings (``python -m services.identity_sim``)."""

    grpc_listen: str = _grpc_listen()
    tls_source: str = _tls_source()
    tls_dir: Path | None = _tls_dir()  # noqa: RUF009 (a dataclasses.field, as variable() is)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SimulatorSettings:
        """Read the simulator's settings; SettingsError names what is missing."""
        return cls(**cls._read_plain(os.environ if env is None else env))


@dataclass(frozen=True, kw_only=True)
class RelaySettings(ProcessSettings):
    """The stand-alone outbox relay's settings (``python -m services.kernel.bus``): which
    store to drain into which NATS."""

    database_url: str = _database_url_field()
    nats_url: str = _nats_url()
    nats_ca_file: Path | None = _nats_ca_file()  # noqa: RUF009 (a dataclasses.field)
    nats_seed_file: Path | None = variable(  # noqa: RUF009
        "SUBSIDY_NATS_SEED_FILE",
        "file holding the nkey seed the relay signs in to NATS with (that of the service whose "
        "store it drains, from Vault's `secret/nats/<service>`)",
        default=None,
    )
    nats_user: str = variable(
        "SUBSIDY_NATS_USER",
        "the NATS user that seed belongs to: a service's name or `operator` (default)",
        default="operator",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RelaySettings:
        """Read the relay's settings; SettingsError names what is missing."""
        env = os.environ if env is None else env
        return cls(database_url=_database_url(env), **cls._read_plain(env))


_VAULT_TOKEN_FILE = Variable(
    "SUBSIDY_VAULT_TOKEN_FILE", "file holding a Vault token (local stack only)"
)


@dataclass(frozen=True, kw_only=True)
class Settings(ProcessSettings):
    """Everything a service process needs to start; docs/operations.md lists every variable."""

    service: str
    grpc_listen: str = _grpc_listen()
    tls_source: str = _tls_source()
    tls_dir: Path | None = _tls_dir()  # noqa: RUF009 (a dataclasses.field, as variable() is)
    tls_server_names: str = _tls_names()
    cert_ttl: str = _cert_ttl()
    grpc_reflection: str = _reflection()
    database_url: str = _database_url_field()
    # The role that owns the schema; `migrate` connects as it and grants the runtime role
    # (SUBSIDY_DATABASE_URL's user) what each table allows (services/kernel/eventstore.py).
    migration_database_url: str | None = variable(
        "SUBSIDY_MIGRATION_DATABASE_URL",
        "`postgresql+psycopg://USER@HOST:PORT/DBNAME?sslmode=...` of the role that owns the "
        "schema, no password; `migrate` runs as it and grants SUBSIDY_DATABASE_URL's role only "
        "what it needs (its events table append-only). Unset: migrate with SUBSIDY_DATABASE_URL "
        "(a dev setup); the chart sets it on its migration Job only",
        default=None,
        also=(
            Variable(
                "SUBSIDY_MIGRATION_DATABASE_PASSWORD_FILE",
                "file holding the migration role's password alone; the chart points it at "
                "the Vault Agent's `/vault/secrets/db-migration-password`",
            ),
        ),
        special=True,
    )
    nats_url: str = _nats_url()
    nats_nkey_path: str = variable(
        "SUBSIDY_NATS_NKEY_PATH",
        "Vault KV v2 path (`<mount>/<path>`) of this service's NATS nkey seed, read at start "
        "with its Vault token; default `secret/nats/<service>`",
        default="",
        deployed=True,
    )
    nats_ca_file: Path | None = _nats_ca_file()  # noqa: RUF009 (a dataclasses.field)
    vault_addr: str = variable(
        "SUBSIDY_VAULT_ADDR", "Vault/OpenBao address (required)", required=True, deployed=True
    )
    vault_auth: str | None = variable(
        "SUBSIDY_VAULT_AUTH",
        "`kubernetes` (the chart) or `token`; unset, a token wins over a role",
        default=None,
        deployed=True,
        special=True,
    )
    vault_token: str | None = variable(
        "SUBSIDY_VAULT_TOKEN",
        "a Vault token instead of Kubernetes auth (local stack only)",
        default=None,
        also=(_VAULT_TOKEN_FILE,),
        special=True,
    )
    vault_k8s_role: str | None = variable(
        "SUBSIDY_VAULT_K8S_ROLE",
        "Kubernetes auth role, `subsidy-<service>`",
        default=None,
        deployed=True,
        special=True,
    )
    vault_transit_mount: str = variable(
        "SUBSIDY_VAULT_TRANSIT_MOUNT",
        "transit mount path, default `transit`",
        default="transit",
        deployed=True,
    )
    metrics_listen: str | None = variable(
        "SUBSIDY_METRICS_LISTEN",
        "Prometheus `/metrics` listen address, e.g. `0.0.0.0:9464`",
        default=None,
        deployed=True,
    )
    workers: int = variable(
        "SUBSIDY_WORKERS",
        "worker processes of the service, all serving its one gRPC port (SO_REUSEPORT), "
        "default 1; above 1 the outbox relay and the sweepers run in one process at a time "
        "(a PostgreSQL advisory lock; services/kernel/workers.py); `/metrics` is the "
        "supervisor's, summed over the workers",
        default=1,
    )
    # One SUBSIDY_<PEER>_ADDR per peer the topology gives the service (see variables()).
    peers: Mapping[str, str] = field(default_factory=dict)
    # The demo and test stacks start with a policy whose claim window is open all day, so that
    # a checkout works at any hour; production starts with the bundled rules.
    initial_policy: Path | None = variable(  # noqa: RUF009 (a dataclasses.field)
        "SUBSIDY_INITIAL_POLICY",
        "catalog: the policy document (YAML) a new campaign starts with; "
        "unset: the bundled Shenzhen 2025 rules",
        default=None,
    )
    expiry_sweep_s: float = variable(
        "SUBSIDY_EXPIRY_SWEEP_S",
        "eligibility: seconds between sweeps that expire qualifications past their validity, "
        "default 5",
        default=5.0,
    )
    checkpoint_interval_s: float = variable(
        "SUBSIDY_CHECKPOINT_INTERVAL_S",
        "audit: seconds between signed checkpoints of the audit log's Merkle tree (one is "
        "signed only when the tree grew; auditors can ask for one at any time), default 60",
        default=60.0,
    )
    detect_every_s: float = variable(
        "SUBSIDY_DETECT_EVERY_S",
        "audit: seconds between rounds of the post-hoc fraud detectors over the log (each "
        "finding opens a case), default 60",
        default=60.0,
    )
    detector_rules_file: Path | None = variable(  # noqa: RUF009 (a dataclasses.field)
        "SUBSIDY_DETECTOR_RULES_FILE",
        "audit: a YAML or JSON mapping of the fraud detectors' rules (services/audit/"
        "detectors.py DetectorRules: thresholds, windows, minimum counts); default: their "
        "defaults",
        default=None,
    )
    audit_origin: str = variable(
        "SUBSIDY_AUDIT_ORIGIN",
        "audit: the origin line of the log's checkpoints and the name of their signing key, a "
        "schema-less URL naming this campaign's log, default `subsidy.local/audit`",
        default="subsidy.local/audit",
    )
    reservation_timeout_s: int = variable(
        "SUBSIDY_RESERVATION_TIMEOUT_S",
        "ledger: seconds a pending reservation lives, default 900",
        default=900,
    )
    # How long a reservation attempt may sit between locking the qualification and the hold
    # before the ledger's sweeper treats it as abandoned (its process died) and refuses it.
    abandon_after_s: int = variable(
        "SUBSIDY_ABANDON_AFTER_S",
        "ledger: seconds before an unfinished reservation attempt is refused, default 60",
        default=60,
    )
    # Per authenticated client and process (services/kernel/ratelimit.py): far above what one
    # platform's checkout page needs, low enough that a loop cannot starve the others.
    rate_registration: str = variable(
        "SUBSIDY_RATE_REGISTRATION",
        "eligibility: RegisterConsumer calls per client, `N/second`, `N/minute` or `N/hour`, "
        "default `200/second`",
        default="200/second",
        deployed=True,
    )
    rate_claims: str = variable(
        "SUBSIDY_RATE_CLAIMS",
        "eligibility: ClaimQualification calls per client, as above, default `200/second`",
        default="200/second",
        deployed=True,
    )
    rate_checkout: str = variable(
        "SUBSIDY_RATE_CHECKOUT",
        "ledger: ReserveSubsidy, CaptureSubsidy and ReleaseSubsidy calls per client together, "
        "as above, default `200/second`",
        default="200/second",
        deployed=True,
    )
    # Per process (services/kernel/admission.py): beyond about this many calls at once a call
    # only waits behind the others, so it is refused with OVERLOADED instead. Off unless set:
    # the right bound depends on the machine (and a batched claim rush gains from concurrency).
    max_concurrent_writes: int = variable(
        "SUBSIDY_MAX_CONCURRENT_WRITES",
        "calls that may change state one process works on at once; beyond, a call is refused "
        "with `RESOURCE_EXHAUSTED` reason `OVERLOADED` and a retry delay; size it as the "
        "process's measured calls per second times the latency you accept (docs/benchmarks.md); "
        "default 0: no bound",
        default=0,
    )
    max_concurrent_reads: int = variable(
        "SUBSIDY_MAX_CONCURRENT_READS",
        "reads (`Get*`, `List*`, `Verify*`, `Check*`) one process works on at once, as above; "
        "health checks are never bounded; default 0: no bound",
        default=0,
    )
    identity_attempts_per_day: int = variable(
        "SUBSIDY_IDENTITY_ATTEMPTS_PER_DAY",
        "eligibility: failed identity checks allowed per ID number and day, default 5",
        default=5,
    )
    funding_ceiling_fen: int = variable(
        "SUBSIDY_POOL_FUNDING_CEILING_FEN",
        "ledger: the most one budget pool may ever be funded with, in fen, default 10^12"
        " (10 billion yuan); a proposal or approval above it is refused",
        default=10**12,
    )
    rpc_deadline_s: float = 5.0

    @classmethod
    def variables_of(cls, service: str) -> tuple[Variable, ...]:
        """Every variable ``service`` reads: the common ones plus its peers' addresses."""
        return (*cls.variables(), *peer_variables(topology.peers(service)))

    @classmethod
    def from_env(
        cls,
        service: str,
        *,
        peers: tuple[str, ...] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Settings:
        """Read the settings of ``service``; ``peers`` names the other services it calls
        (by default what services/kernel/topology.py declares)."""
        env = os.environ if env is None else env
        if peers is None:
            peers = topology.peers(service)
        auth = env.get("SUBSIDY_VAULT_AUTH") or None
        if auth not in (None, "token", "kubernetes"):
            raise SettingsError(f"SUBSIDY_VAULT_AUTH must be token or kubernetes, got {auth!r}")
        token = env.get("SUBSIDY_VAULT_TOKEN") or None
        token_file = env.get("SUBSIDY_VAULT_TOKEN_FILE")
        if not token and token_file and auth != "kubernetes":
            token = Path(token_file).read_text().strip()
        role = env.get("SUBSIDY_VAULT_K8S_ROLE") or None
        if auth == "kubernetes":
            token = None  # a stray token in a pod's environment must not replace its role
            if not role:
                raise SettingsError(
                    "missing required environment variable SUBSIDY_VAULT_K8S_ROLE "
                    "(SUBSIDY_VAULT_AUTH is kubernetes)"
                )
        elif auth == "token" and not token:
            raise SettingsError(
                "missing required environment variable SUBSIDY_VAULT_TOKEN "
                "(or SUBSIDY_VAULT_TOKEN_FILE; SUBSIDY_VAULT_AUTH is token)"
            )
        elif not token and not role:
            raise SettingsError(
                "missing required environment variable SUBSIDY_VAULT_TOKEN "
                "(or SUBSIDY_VAULT_TOKEN_FILE, or SUBSIDY_VAULT_K8S_ROLE in a cluster)"
            )
        database_url = _database_url(env)
        peer_addrs = {p: _get(env, topology.addr_variable(p)) for p in peers}
        return cls(
            service=service,
            database_url=database_url,
            migration_database_url=_migration_database_url(env),
            vault_auth=auth,
            vault_token=token,
            vault_k8s_role=role,
            peers=peer_addrs,
            **cls._read_plain(env),
        )


def peer_variables(peers: tuple[str, ...]) -> tuple[Variable, ...]:
    """The required ``SUBSIDY_<PEER>_ADDR`` variables of a service that calls ``peers``."""
    return tuple(
        Variable(
            topology.addr_variable(p),
            "`host:port` of the identity authority (or its simulator)"
            if p == topology.IDENTITY_AUTHORITY
            else f"`host:port` of the {p} service",
            required=True,
            deployed=True,
        )
        for p in peers
    )


def _owner_url(service: str) -> Any:
    upper = service.upper()
    return variable(
        f"SUBSIDY_{upper}_MIGRATION_DATABASE_URL",
        f"backup and restore: the {service} database as its migration role, "
        "`postgresql+psycopg://USER@HOST:PORT/DBNAME?sslmode=...`, no password; unset: the "
        "local stack's",
        default="",
        also=(
            Variable(
                f"SUBSIDY_{upper}_MIGRATION_DATABASE_PASSWORD_FILE",
                "file holding that role's password alone",
            ),
        ),
    )


@dataclass(frozen=True, kw_only=True)
class CliSettings:
    """The variables ``subsidyctl`` reads (its Typer options' ``envvar`` and its own look-ups;
    tests/unit/test_cli.py fails if it reads one not declared here). Not a service's: the
    docs list them with the CLI in docs/operations.md, not in the settings reference."""

    base_port: int = variable(
        "SUBSIDY_BASE_PORT", "the local stack's base port, default 7100", default=7100
    )
    local_nats_nodes: int = variable(
        "SUBSIDY_LOCAL_NATS_NODES",
        "the local stack's NATS JetStream nodes: 1, or a cluster of that many (streams at that "
        "many replicas), default 1",
        default=1,
    )
    local_workers: int = variable(
        "SUBSIDY_LOCAL_WORKERS",
        "the local stack's worker processes per service, sharing its port, default 1",
        default=1,
    )
    run_dir: Path = variable(  # noqa: RUF009 (a dataclasses.field, as variable() is)
        "SUBSIDY_RUN_DIR",
        "the local stack's run folder (data, logs, traces, certs), default `run`",
        default=Path("run"),
    )
    catalog_addr: str = variable(
        "SUBSIDY_CATALOG_ADDR",
        "catalog service `host:port` for the catalog commands, default the local stack's",
        default="",
    )
    identity: Path | None = variable(  # noqa: RUF009
        "SUBSIDY_IDENTITY",
        "directory with `tls.crt`, `tls.key`, `ca.crt` every command presents, instead of "
        "the demo identity that fits the command",
        default=None,
    )
    # backup and restore against a deployment (the chart's backup CronJob sets these): the
    # Vault the services use, and each service database's owner (migration) role.
    vault_addr: str = variable(
        "SUBSIDY_VAULT_ADDR",
        "backup and restore: Vault/OpenBao address, default the local stack's",
        default="",
    )
    vault_token_file: Path | None = variable(  # noqa: RUF009
        "SUBSIDY_VAULT_TOKEN_FILE",
        "backup and restore: file holding a Vault token, default the local stack's",
        default=None,
    )
    vault_k8s_role: str = variable(
        "SUBSIDY_VAULT_K8S_ROLE",
        "backup and restore: Kubernetes auth role to log in to Vault as (no token file), "
        "`subsidy-backup` in the chart",
        default="",
    )
    vault_transit_mount: str = variable(
        "SUBSIDY_VAULT_TRANSIT_MOUNT",
        "backup and restore: Vault's transit mount, default `transit`",
        default="transit",
    )
    catalog_migration_database_url: str = _owner_url("catalog")
    eligibility_migration_database_url: str = _owner_url("eligibility")
    ledger_migration_database_url: str = _owner_url("ledger")
    audit_migration_database_url: str = _owner_url("audit")

    @classmethod
    def variables(cls) -> tuple[Variable, ...]:
        """Every variable subsidyctl reads, in declaration order."""
        return tuple(v for f in dataclasses.fields(cls) for v in f.metadata.get("variables", ()))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CliSettings:
        """Read subsidyctl's settings; SettingsError names a malformed one."""
        env = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var: Variable = f.metadata["variables"][0]
            if raw := env.get(var.name):
                values[f.name] = _parse(var.name, raw, hints[f.name])
        return cls(**values)
