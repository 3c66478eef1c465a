"""``audit prove --order``: one order's entries with their inclusion proofs, for
``subsidyctl/verify_proof.py`` offline."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from services.kernel import rpc
from services.kernel.contract import merkle
from subsidy.v1 import (
    audit_pb2,
    audit_pb2_grpc,
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
from .keys import AuditAddrOpt


async def prove(audit: audit_pb2_grpc.AuditServiceAsyncStub, order_id: str) -> dict[str, Any]:
    """The entries naming ``order_id``, each with its inclusion proof against a fresh signed
    checkpoint: everything ``subsidyctl/verify_proof.py`` needs, offline."""
    cp = await audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(fresh=True))
    page = await audit.ListOrderEntries(audit_pb2.ListOrderEntriesRequest(order_id=order_id))
    entries = []
    for e in page.entries:
        if e.index >= cp.tree_size:
            continue
        proof = await audit.GetInclusionProof(
            audit_pb2.GetInclusionProofRequest(index=e.index, tree_size=cp.tree_size)
        )
        leaf = merkle.leaf_hash(e.envelope_bytes)
        merkle.verify_inclusion(e.index, cp.tree_size, leaf, list(proof.hashes), cp.root_hash)
        entries.append(
            {
                "index": e.index,
                "event_type": e.envelope.event_type,  # labels for people; the bytes are proved
                "event_id": e.envelope.event_id,
                "service": e.envelope.service,
                "envelope_b64": base64.b64encode(e.envelope_bytes).decode(),
                "proof_b64": [base64.b64encode(h).decode() for h in proof.hashes],
            }
        )
    return {
        "order_id": order_id,
        "tree_size": cp.tree_size,
        "root_hex": cp.root_hash.hex(),
        "checkpoint": cp.note,
        "entries": entries,
    }


def prove_command(
    order: Annotated[str, typer.Option("--order", help="the platform's order id")],
    audit: AuditAddrOpt = "",
    out: Annotated[
        Path | None, typer.Option(dir_okay=False, help="also write the proof to this file")
    ] = None,
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Print one order's entries with their inclusion proofs against the current signed
    checkpoint; `python subsidyctl/verify_proof.py FILE --key VKEY` checks them offline."""
    who = identity(identity_dir, AUDITOR_DEMO)

    async def run() -> dict[str, Any]:
        channel = rpc.channel(audit or local_address("audit"), who)
        try:
            return await prove(audit_pb2_grpc.AuditServiceStub(channel), order)
        finally:
            await channel.close()

    answer = asyncio.run(run())
    if out is not None:
        out.write_text(json.dumps(answer, indent=1, ensure_ascii=False) + "\n")
    if not json_only and not answer["entries"]:
        note(f"no entry of the audit log names order {order}")
    emit(answer)
    if not answer["entries"]:
        raise typer.Exit(EXIT_NO)
