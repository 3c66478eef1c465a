"""``backup --out DIR`` and ``restore DIR``: encrypted archives of every service's database
and the audit log's signed checkpoint (what is in one and what is not: :mod:`subsidyctl.backup`;
the runbook: docs/operations.md, "Backup and restore").

Where they work:

- **The local stack** (default): its PostgreSQL as each service's migration role (passwords in
  the run folder), its OpenBao (the root token in the run folder). ``restore`` against a
  running ``subsidyctl up`` stops its services once the archive has passed every check, restores,
  and starts them again (PostgreSQL, NATS and OpenBao keep running).
- **A deployment**: the variables the chart's backup CronJob sets, named as the services'
  settings name them: ``SUBSIDY_<SERVICE>_MIGRATION_DATABASE_URL`` (+ ``_PASSWORD_FILE``) for
  each database, ``SUBSIDY_VAULT_ADDR`` with ``SUBSIDY_VAULT_K8S_ROLE`` (Kubernetes auth) or
  ``SUBSIDY_VAULT_TOKEN_FILE``, ``SUBSIDY_VAULT_TRANSIT_MOUNT``. NATS is not needed: JetStream
  is not archived (subsidyctl/backup.py says why).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import hvac
import typer

from services.kernel import rpc, tls, vault
from services.kernel.contract.checkpoint import VerifierKey
from subsidy.v1 import audit_pb2, audit_pb2_grpc

from ..ports import QUIESCE, RESUME, STATE, Ports
from ..stack.certs import AUDITOR_DEMO
from ..stack.processes import HOST
from .audit import DEFAULT_ORIGIN, KeyOpt, keys_from_file
from .common import (
    EXIT_NO,
    AuditorIdentityOpt,
    Failure,
    JsonOpt,
    base_port,
    emit,
    identity,
    local_address,
    note,
    run_dir,
)
from .progress import PhaseProgress

if TYPE_CHECKING:  # the archive (psycopg, SQLAlchemy, the event store) loads when a command runs
    from .. import backup as archive

PANEL = "Backup"
app = typer.Typer()

VaultAddrOpt = Annotated[
    str,
    typer.Option(
        "--vault-addr", envvar="SUBSIDY_VAULT_ADDR", help="Vault (default: the local stack's)"
    ),
]
VaultTokenOpt = Annotated[
    Path | None,
    typer.Option(
        "--vault-token-file",
        envvar="SUBSIDY_VAULT_TOKEN_FILE",
        dir_okay=False,
        help="a Vault token (default: the local stack's root token)",
    ),
]
VaultRoleOpt = Annotated[
    str,
    typer.Option(
        "--vault-k8s-role",
        envvar="SUBSIDY_VAULT_K8S_ROLE",
        help="log in to Vault with Kubernetes auth as this role (in a pod; no token file)",
    ),
]
MountOpt = Annotated[
    str,
    typer.Option("--transit-mount", envvar="SUBSIDY_VAULT_TRANSIT_MOUNT", help="transit mount"),
]


# -- where ----------------------------------------------------------------------------------
def deployed_databases() -> dict[str, archive.Database] | None:
    """The databases a deployment names (see the module's docstring), or None when it names
    none (the local stack's then)."""
    from .. import backup as archive
    from ..stack.postgres import SERVICE_DATABASES

    given = {
        "catalog": (
            os.environ.get("SUBSIDY_CATALOG_MIGRATION_DATABASE_URL", ""),
            os.environ.get("SUBSIDY_CATALOG_MIGRATION_DATABASE_PASSWORD_FILE", ""),
        ),
        "eligibility": (
            os.environ.get("SUBSIDY_ELIGIBILITY_MIGRATION_DATABASE_URL", ""),
            os.environ.get("SUBSIDY_ELIGIBILITY_MIGRATION_DATABASE_PASSWORD_FILE", ""),
        ),
        "ledger": (
            os.environ.get("SUBSIDY_LEDGER_MIGRATION_DATABASE_URL", ""),
            os.environ.get("SUBSIDY_LEDGER_MIGRATION_DATABASE_PASSWORD_FILE", ""),
        ),
        "audit": (
            os.environ.get("SUBSIDY_AUDIT_MIGRATION_DATABASE_URL", ""),
            os.environ.get("SUBSIDY_AUDIT_MIGRATION_DATABASE_PASSWORD_FILE", ""),
        ),
    }
    if not any(url for url, _ in given.values()):
        return None
    found = {}
    for name in SERVICE_DATABASES:
        url, password_file = given[name]
        if not url:
            raise Failure(f"SUBSIDY_{name.upper()}_MIGRATION_DATABASE_URL is not set")
        password = ""
        if password_file:
            try:
                password = Path(password_file).read_text().strip()
            except OSError as exc:
                raise Failure(f"cannot read {password_file}: {exc.strerror}") from None
        try:
            found[name] = archive.Database.from_url(name, url, password)
        except archive.BackupError as exc:
            raise Failure(str(exc)) from None
    return found


def local_databases() -> dict[str, archive.Database]:
    """The local stack's service databases, as their migration roles (passwords from the run
    folder's ``secrets``, written at every start)."""
    from .. import backup as archive
    from ..stack.postgres import SERVICE_DATABASES

    secrets = run_dir() / "secrets"
    passwords = {}
    for name in SERVICE_DATABASES:
        path = secrets / f"{name}-db-migration-password"
        try:
            passwords[name] = path.read_text().strip()
        except OSError:
            raise Failure(f"no migration password in {path}: start the local stack first") from None
    return archive.migration_databases(HOST, Ports(base_port()).postgres, passwords)


def vault_client(
    vault_addr: str, vault_token_file: Path | None, k8s_role: str, mount: str
) -> vault.Vault:
    """Vault by Kubernetes auth (``--vault-k8s-role``), with ``--vault-token-file``, or the
    local stack's."""
    addr = vault_addr or f"http://{HOST}:{Ports(base_port()).bao}"
    if k8s_role and vault_token_file is None:
        try:
            return vault.connect(addr, k8s_role=k8s_role, transit_mount=mount)
        except (OSError, hvac.exceptions.VaultError) as exc:
            raise Failure(f"cannot log in to Vault at {addr} as {k8s_role}: {exc!r}") from None
    from .certs import TOKEN_FILE

    token_file = vault_token_file or run_dir() / TOKEN_FILE
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise Failure(f"cannot read the Vault token file {token_file}: {exc.strerror}") from None
    return vault.Vault(hvac.Client(url=addr, token=token, timeout=10), mount)


async def latest_checkpoint(address: str, who: tls.CertificateSource) -> str:
    """A fresh signed checkpoint of the audit log (AuditService.GetCheckpoint)."""
    channel = rpc.channel(address, who)
    try:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        reply = await stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(fresh=True))
        return str(reply.note)
    finally:
        await channel.close()


# -- a running local stack ------------------------------------------------------------------
class RunningStack:
    """A ``subsidyctl up`` serving from the run folder: asked by signal to stop its services
    (and reset the events stream: LocalStack.reset_event_stream) and to start them again, it
    answers in ``stack.state`` (subsidyctl/cli/stack.py)."""

    def __init__(self, folder: Path, pid: int) -> None:
        self.state = folder / STATE
        self.pid = pid

    @classmethod
    def find(cls, folder: Path) -> RunningStack | None:
        """The stack holding the run folder's lock, or None if none does."""
        lock = folder / "stack.lock"
        if not lock.exists():
            return None
        with lock.open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                found = re.match(r"pid (\d+)", fh.read())
                if found is None:
                    raise Failure(f"{lock} is held but names no pid") from None
                return cls(folder, int(found.group(1)))
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None

    def _ask(self, sig: int, want: str, within: float) -> None:
        self.state.write_text(f"asked {want}\n")
        os.kill(self.pid, sig)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            said = self.state.read_text().strip() if self.state.exists() else ""
            if said == want:
                return
            if said.startswith("failed"):
                raise Failure(f"the local stack (pid {self.pid}): {said}")
            time.sleep(0.2)
        raise Failure(f"the local stack (pid {self.pid}) did not say {want!r} in {within:.0f} s")

    def quiesce(self) -> None:
        """Stop the services; PostgreSQL, NATS and OpenBao keep running."""
        self._ask(QUIESCE, "quiesced", 60)

    def resume(self) -> None:
        """Start the services and wait until each one's health check says SERVING."""
        self._ask(RESUME, "serving", 180)


# -- commands -------------------------------------------------------------------------------
@app.command("backup", rich_help_panel=PANEL)
def backup_command(
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="a new (or empty) directory")],
    dated: Annotated[
        bool,
        typer.Option(
            "--dated", help="write into a new subdirectory of --out named by the UTC time"
        ),
    ] = False,
    keep: Annotated[
        int,
        typer.Option(
            "--keep",
            min=0,
            help="with --dated: then delete all but the newest KEEP dated archives (0: keep all)",
        ),
    ] = 0,
    stored_checkpoint: Annotated[
        bool,
        typer.Option(
            "--stored-checkpoint",
            help="archive the audit log's newest stored signed checkpoint (from its database) "
            "instead of asking the audit service for a fresh one",
        ),
    ] = False,
    audit: Annotated[
        str, typer.Option(help="audit service HOST:PORT (default: the local stack's)")
    ] = "",
    vault_addr: VaultAddrOpt = "",
    vault_token_file: VaultTokenOpt = None,
    vault_k8s_role: VaultRoleOpt = "",
    transit_mount: MountOpt = "transit",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Write every service's database and the audit log's latest signed checkpoint into
    ``--out``, encrypted with a fresh data key from Vault, with a manifest of SHA-256
    checksums."""
    from .. import backup as archive

    databases = deployed_databases() or local_databases()
    keys = vault_client(vault_addr, vault_token_file, vault_k8s_role, transit_mount)
    target = archive.dated(out) if dated else out
    try:
        if stored_checkpoint:
            checkpoint = archive.stored_checkpoint(databases["audit"])
        else:
            who = identity(identity_dir, AUDITOR_DEMO)
            checkpoint = asyncio.run(latest_checkpoint(audit or local_address("audit"), who))
        with PhaseProgress(unit="databases", quiet=json_only) as bar:
            manifest = archive.backup(
                list(databases.values()), keys, checkpoint, target, progress=bar.update
            )
        pruned = archive.prune(out, keep) if dated and keep else []
    except (archive.BackupError, vault.VaultUnavailable) as exc:
        raise Failure(str(exc)) from None
    emit(
        {
            "out": str(target),
            "databases": manifest["databases"],
            "files": {name: meta["sha256"] for name, meta in manifest["files"].items()},
            "tree_size": manifest["checkpoint"]["tree_size"],
            "root_hex": manifest["checkpoint"]["root_hex"],
            "pruned": [p.name for p in pruned],
        }
    )


@app.command("restore", rich_help_panel=PANEL)
def restore_command(
    archive_dir: Annotated[
        Path, typer.Argument(metavar="DIR", file_okay=False, help="what `backup --out` wrote")
    ],
    force: Annotated[
        bool, typer.Option("--force", help="replace databases that are not empty")
    ] = False,
    erased: Annotated[
        list[str] | None,
        typer.Option(
            "--erased",
            help="a consumer erased since the backup was taken and missing from the erasure "
            "register: their data key is deleted again (repeat for each)",
        ),
    ] = None,
    key_file: KeyOpt = None,
    vault_addr: VaultAddrOpt = "",
    vault_token_file: VaultTokenOpt = None,
    vault_k8s_role: VaultRoleOpt = "",
    transit_mount: MountOpt = "transit",
    origin: Annotated[str, typer.Option(help="the audit log's origin")] = DEFAULT_ORIGIN,
    audit_verify: Annotated[
        bool,
        typer.Option(
            "--audit-verify/--no-audit-verify",
            help="when it restarted a running local stack: then run `audit verify` against it "
            "(every total compared with the live services)",
        ),
    ] = True,
    json_only: JsonOpt = False,
) -> None:
    """Check every checksum of ``DIR``, restore it into empty databases (a running local
    stack's services are stopped and started again), re-apply erasures, verify the restored
    log against the archived signed checkpoint, replay every read model, and run `audit
    verify` on the restarted stack."""
    from .. import backup as archive

    deployed = deployed_databases()
    databases = deployed or local_databases()
    keys = vault_client(vault_addr, vault_token_file, vault_k8s_role, transit_mount)
    verifier_keys = _verifier_keys(key_file, keys, origin)
    running = None if deployed else RunningStack.find(run_dir())
    stopped: list[RunningStack] = []
    try:
        with PhaseProgress(unit="steps", quiet=json_only) as bar:

            def quiesce() -> None:
                if running is not None:
                    bar.update("QUIESCE", 0, 1)
                    stopped.append(running)  # started again below, even if this fails
                    running.quiesce()
                    bar.update("QUIESCE", 1, 1)

            try:
                restored = archive.restore(
                    archive_dir,
                    databases,
                    keys,
                    verifier_keys,
                    force=force,
                    erased=erased or (),
                    progress=bar.update,
                    before_change=quiesce,
                )
            finally:
                for stack in stopped:  # also when the restore failed: serve what there is
                    bar.update("RESTART", 0, 1)
                    stack.resume()
                    bar.update("RESTART", 1, 1)
    except archive.BackupError as exc:
        raise Failure(str(exc)) from None
    answer = restored.as_json() | {"services_restarted": bool(stopped), "audit_verify": None}
    if stopped and audit_verify and restored.ok:
        verified = _audit_verify(json_only)
        answer["audit_verify"] = verified
        answer["ok"] = restored.ok and verified.get("ok") is True
    if not json_only:
        for d in answer["differences"]:
            note(d["message"])
    emit(answer)
    if not answer["ok"]:
        raise typer.Exit(EXIT_NO)


def _audit_verify(quiet: bool) -> dict[str, Any]:
    """``subsidyctl audit verify`` as its own process against the restarted stack (the run
    folder's demo auditor): its JSON answer, or why there is none."""
    if not quiet:
        note("audit verify: waiting for the republished events, then checking every total ...")
    done = subprocess.run(
        [sys.executable, "-m", "subsidyctl", "audit", "verify", "--json"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = done.stdout.strip().splitlines()
    try:
        answer: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": done.stderr.strip()[-800:]}
    return answer


def _verifier_keys(key_file: Path | None, keys: vault.Vault, origin: str) -> list[VerifierKey]:
    """The tree-head key to check the archived checkpoint with: a pinned file, else every
    version Vault holds (the Vault the archive's data key opens with)."""
    if key_file is not None:
        return keys_from_file(key_file)
    try:
        public = keys.tree_head_public_keys_sync()
    except vault.VaultUnavailable as exc:
        raise Failure(f"cannot read the tree-head key from Vault: {exc}") from None
    return [VerifierKey(origin, pk) for _, pk in sorted(public.items())]
