"""``backup --out DIR`` and ``restore DIR``: encrypted archives of every service's database
and the audit log's signed checkpoint (what is in one and what is not: :mod:`subsidyctl.backup`;
the runbook: docs/operations.md, "Backup and restore").

Both work on the local stack's PostgreSQL (the run folder's migration passwords, the base
port's server) and Vault (its root token in the run folder, or ``--vault-addr`` and
``--vault-token-file``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import hvac
import typer

from services.kernel import rpc, tls, vault
from subsidy.v1 import audit_pb2, audit_pb2_grpc

from .. import backup as archive
from ..localstack import Ports
from ..stack.certs import AUDITOR_DEMO
from ..stack.postgres import SERVICE_DATABASES
from ..stack.processes import HOST
from .audit import DEFAULT_ORIGIN, AuditAddrOpt, KeyOpt, VaultAddrOpt, VaultTokenOpt, key_source
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

PANEL = "Backup"
app = typer.Typer()


def local_databases() -> dict[str, archive.Database]:
    """The local stack's service databases, as their migration roles (passwords from the run
    folder's ``secrets``, written at every start)."""
    secrets = run_dir() / "secrets"
    passwords = {}
    for name in SERVICE_DATABASES:
        path = secrets / f"{name}-db-migration-password"
        try:
            passwords[name] = path.read_text().strip()
        except OSError:
            raise Failure(f"no migration password in {path}: start the local stack first") from None
    return archive.migration_databases(HOST, Ports(base_port()).postgres, passwords)


def vault_client(vault_addr: str, vault_token_file: Path | None, mount: str) -> vault.Vault:
    """Vault at ``--vault-addr`` with ``--vault-token-file``, or the local stack's."""
    from .certs import TOKEN_FILE

    token_file = vault_token_file or run_dir() / TOKEN_FILE
    addr = vault_addr or f"http://{HOST}:{Ports(base_port()).bao}"
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


@app.command("backup", rich_help_panel=PANEL)
def backup_command(
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="a new (or empty) directory")],
    audit: AuditAddrOpt = "",
    vault_addr: VaultAddrOpt = "",
    vault_token_file: VaultTokenOpt = None,
    transit_mount: Annotated[str, typer.Option("--transit-mount")] = "transit",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Write every service's database and the audit log's latest signed checkpoint into
    ``--out``, encrypted with a fresh data key from Vault, with a manifest of SHA-256
    checksums."""
    databases = local_databases()
    keys = vault_client(vault_addr, vault_token_file, transit_mount)
    who = identity(identity_dir, AUDITOR_DEMO)
    checkpoint = asyncio.run(latest_checkpoint(audit or local_address("audit"), who))
    try:
        with PhaseProgress(unit="databases", quiet=json_only) as bar:
            manifest = archive.backup(
                list(databases.values()), keys, checkpoint, out, progress=bar.update
            )
    except (archive.BackupError, vault.VaultUnavailable) as exc:
        raise Failure(str(exc)) from None
    emit(
        {
            "out": str(out),
            "databases": manifest["databases"],
            "files": {name: meta["sha256"] for name, meta in manifest["files"].items()},
            "tree_size": manifest["checkpoint"]["tree_size"],
            "root_hex": manifest["checkpoint"]["root_hex"],
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
            help="a consumer erased since the backup was taken: their data key is deleted "
            "again (repeat for each)",
        ),
    ] = None,
    key_file: KeyOpt = None,
    vault_addr: VaultAddrOpt = "",
    vault_token_file: VaultTokenOpt = None,
    transit_mount: Annotated[str, typer.Option("--transit-mount")] = "transit",
    origin: Annotated[str, typer.Option(help="the audit log's origin")] = DEFAULT_ORIGIN,
    json_only: JsonOpt = False,
) -> None:
    """Check every checksum of ``DIR``, restore it into the local stack's empty databases (with
    its services stopped), re-apply erasures, and verify the restored audit log against the
    archived signed checkpoint."""
    databases = local_databases()
    keys = vault_client(vault_addr, vault_token_file, transit_mount)
    verifier_keys = key_source(key_file, vault_addr, vault_token_file, transit_mount)(origin)
    try:
        with PhaseProgress(unit="files", quiet=json_only) as bar:
            restored = archive.restore(
                archive_dir,
                databases,
                keys,
                verifier_keys,
                force=force,
                erased=erased or (),
                progress=bar.update,
            )
    except archive.BackupError as exc:
        raise Failure(str(exc)) from None
    answer = restored.as_json()
    if not json_only:
        for d in answer["differences"]:
            note(d["message"])
    emit(answer)
    if not restored.ok:
        raise typer.Exit(EXIT_NO)
