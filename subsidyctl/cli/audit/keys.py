"""Where the checkpoint's verifier keys come from (a pinned file or Vault transit), the options
the commands share, and ``audit key``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import hvac
import typer

from services.kernel import vault
from services.kernel.contract.checkpoint import (
    NoteInvalid,
    VerifierKey,
)

from ...ports import Ports
from ..common import (
    Failure,
    JsonOpt,
    emit,
    run_dir,
)

DEFAULT_ORIGIN = "subsidy.local/audit"


def keys_from_file(path: Path) -> list[VerifierKey]:
    """The verifier keys in a file, one vkey a line (``#`` comments and blank lines allowed)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise Failure(f"cannot read the key file {path}: {exc.strerror}") from None
    try:
        return [VerifierKey.parse(ln) for ln in lines if ln.strip() and not ln.startswith("#")]
    except NoteInvalid as exc:
        raise Failure(f"{path}: {exc}") from None


def keys_from_vault(addr: str, token: str, mount: str, origin: str) -> list[VerifierKey]:
    """The tree-head key's public keys as Vault transit publishes them (every version)."""
    try:
        client = vault.Vault(hvac.Client(url=addr, token=token, timeout=10), mount)
        public = client.tree_head_public_keys_sync()
    except vault.VaultUnavailable as exc:
        raise Failure(f"cannot read the tree-head key from Vault at {addr}: {exc}") from None
    return [VerifierKey(origin, pk) for _, pk in sorted(public.items())]


def key_source(
    key_file: Path | None, vault_addr: str, vault_token_file: Path | None, mount: str
) -> Callable[[str], list[VerifierKey]]:
    """Where the trusted keys come from: a pinned file, the given Vault, or the local stack's
    Vault (its root token in the run folder, as ``certs issue`` reads it)."""

    def resolve(origin: str) -> list[VerifierKey]:
        if key_file is not None:
            return keys_from_file(key_file)
        if vault_addr:
            if vault_token_file is None:
                raise Failure("--vault-addr needs --vault-token-file (a token that may read it)")
            return keys_from_vault(vault_addr, _read_token(vault_token_file), mount, origin)
        from ..certs import TOKEN_FILE

        token_file = run_dir() / TOKEN_FILE
        if not token_file.exists():
            raise Failure(
                "no key to check the checkpoint with: pass --key FILE (the log's vkey, "
                "docs/audit.md) or --vault-addr and --vault-token-file"
            )
        local = f"http://127.0.0.1:{Ports(_base()).bao}"
        return keys_from_vault(local, _read_token(token_file), mount, origin)

    return resolve


def _base() -> int:
    from ..common import base_port

    return base_port()


def _read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise Failure(f"cannot read the Vault token file {path}: {exc.strerror}") from None


KeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--key",
        dir_okay=False,
        help="the log's verifier key (a C2SP vkey line, as `audit key` prints it) to check "
        "checkpoints with; default: read it from Vault (--vault-addr, or the local stack's)",
    ),
]
VaultAddrOpt = Annotated[
    str, typer.Option("--vault-addr", help="read the tree-head public key from this Vault")
]
VaultTokenOpt = Annotated[
    Path | None,
    typer.Option(
        "--vault-token-file",
        dir_okay=False,
        help="a Vault token that may read transit/keys/subsidy-tree-head",
    ),
]
MountOpt = Annotated[str, typer.Option("--transit-mount", help="Vault's transit mount")]
AuditAddrOpt = Annotated[
    str, typer.Option(help="audit service HOST:PORT (default: the local stack's)")
]


def key_command(
    origin: Annotated[
        str, typer.Option(help="the log's origin (SUBSIDY_AUDIT_ORIGIN of its audit service)")
    ] = DEFAULT_ORIGIN,
    vault_addr: VaultAddrOpt = "",
    vault_token_file: VaultTokenOpt = None,
    transit_mount: MountOpt = "transit",
    out: Annotated[
        Path | None, typer.Option(dir_okay=False, help="write the vkeys to this file to pin")
    ] = None,
    json_only: JsonOpt = False,
) -> None:
    """Print the verifier key (C2SP vkey) of every version of the tree-head signing key, read
    from Vault transit: what an auditor pins and passes as ``--key``."""
    keys = key_source(None, vault_addr, vault_token_file, transit_mount)(origin)
    if out is not None:
        out.write_text("".join(f"{k.encode()}\n" for k in keys))
    emit({"origin": origin, "vkeys": [k.encode() for k in keys]})
