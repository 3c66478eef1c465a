"""``audit verify``: the command line of :func:`.replay.audit_log`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from services.kernel import rpc, topology
from services.kernel.contract.checkpoint import (
    VerifierKey,
)
from subsidy.v1 import (
    audit_pb2_grpc,
    catalog_pb2_grpc,
    eventlog_pb2_grpc,
    ledger_pb2_grpc,
    usage_pb2_grpc,
)

from ...stack.certs import AUDITOR_DEMO
from ..common import (
    EXIT_NO,
    AuditorIdentityOpt,
    JsonOpt,
    emit,
    identity,
    local_address,
    note,
)
from ..progress import PhaseProgress
from .keys import AuditAddrOpt, KeyOpt, MountOpt, VaultAddrOpt, VaultTokenOpt, key_source
from .live import Sources
from .replay import SAMPLE, SETTLE_S, audit_log, read_trusted, report, write_trusted


def verify_command(
    audit: AuditAddrOpt = "",
    ledger: Annotated[
        str, typer.Option(help="ledger service HOST:PORT (default: the local stack's)")
    ] = "",
    catalog: Annotated[
        str, typer.Option(help="catalog service HOST:PORT (default: the local stack's)")
    ] = "",
    eligibility: Annotated[
        str, typer.Option(help="eligibility service HOST:PORT (default: the local stack's)")
    ] = "",
    trusted_file: Annotated[
        Path | None,
        typer.Option(
            "--trusted",
            dir_okay=False,
            help="the trusted state of the last run: the log must extend it; written (or "
            "created) after every run that passes",
        ),
    ] = None,
    key_file: KeyOpt = None,
    vault_addr: VaultAddrOpt = "",
    vault_token_file: VaultTokenOpt = None,
    transit_mount: MountOpt = "transit",
    sample: Annotated[
        int, typer.Option(min=0, max=1000, help="random entries whose inclusion proofs are checked")
    ] = SAMPLE,
    settle_s: Annotated[
        float,
        typer.Option(
            "--settle-s",
            min=0,
            help="how long to wait for the log to receive events the stores already hold",
        ),
    ] = SETTLE_S,
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Check the audit log's signed tree, its history, every service's store and every total
    the services report against each other."""
    given = {"catalog": catalog, "eligibility": eligibility, "ledger": ledger, "audit": audit}
    addresses = {name: given[name] or local_address(name) for name in topology.SERVICE_NAMES}
    who = identity(identity_dir, AUDITOR_DEMO)
    resolve = key_source(key_file, vault_addr, vault_token_file, transit_mount)
    trusted = read_trusted(trusted_file)

    async def keys(origin: str) -> list[VerifierKey]:
        return await asyncio.to_thread(resolve, origin)

    async def run() -> dict[str, Any]:
        channels = {name: rpc.channel(addr, who) for name, addr in addresses.items()}
        try:
            src = Sources(
                audit_pb2_grpc.AuditServiceStub(channels["audit"]),
                ledger_pb2_grpc.LedgerServiceStub(channels["ledger"]),
                catalog_pb2_grpc.CatalogServiceStub(channels["catalog"]),
                usage_pb2_grpc.UsageServiceStub(channels["eligibility"]),
                {n: eventlog_pb2_grpc.EventLogServiceStub(ch) for n, ch in channels.items()},
            )
            # A bar on a terminal only: piped, audit verify prints nothing but its answer.
            with PhaseProgress(unit="entries", plain=False, quiet=json_only) as bar:
                found, state = await audit_log(
                    src,
                    keys=keys,
                    trusted=trusted,
                    progress=bar.update,
                    settle_s=settle_s,
                    sample=sample,
                )
        finally:
            for ch in channels.values():
                await ch.close()
        answer = report(found, state)
        if trusted_file is not None:
            answer["trusted"] = {
                "file": str(trusted_file),
                "tree_size": trusted.tree_size if trusted else None,
                "written": False,
            }
            if found.ok and found.checkpoint is not None:
                write_trusted(trusted_file, state.trusted_state(found.note, found.checkpoint))
                answer["trusted"]["written"] = True
        return answer

    answer = asyncio.run(run())
    if not json_only:  # for people: one line per disagreement, then the JSON answer
        for d in answer["differences"]:
            note(d["message"])
    emit(answer)
    if not answer["ok"]:
        raise typer.Exit(EXIT_NO)
