"""Identities for the local stack: ``subsidyctl certs issue``.

  subsidyctl certs issue --role ROLE --name NAME --out DIR [--ttl 24h] [--host H ...]

Issues one certificate from the running local stack's CA (Vault's PKI engine in its OpenBao)
for ``spiffe://subsidy.local/ROLE/NAME`` and writes ``tls.crt``, ``tls.key`` (0600) and
``ca.crt`` into DIR, the directory every command's ``--identity`` takes. The stack is reached
with its root token, ``RUN_DIR/LOCAL-ONLY-vault-token``, at the OpenBao of ``--base-port``:
for a developer's machine only; in a cluster certificates come from Vault Agent or cert-manager
(docs/security.md). Prints one JSON object: the identity, the directory, the serial (what
``bao write pki_int/revoke serial_number=...`` takes) and when it expires.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import hvac
import requests
import typer

from services.kernel import pki
from services.kernel.identity import Caller, NotAnIdentity, Role

from ..ports import Ports
from ..stack import HOST
from ..stack.certs import DEMO_TTL, issue_to
from .common import (
    DEFAULT_BASE_PORT,
    DEFAULT_RUN_DIR,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    BasePortOpt,
    Failure,
    JsonOpt,
    RunDirOpt,
    emit,
)

app = typer.Typer(
    name="certs",
    help="Issue identities (client and server certificates) from the local stack's CA.",
    no_args_is_help=True,
)
TOKEN_FILE = "LOCAL-ONLY-vault-token"


def vault_client(run_dir: Path, base_port: int) -> hvac.Client:
    """The local stack's OpenBao, with the root token the stack wrote into its run folder."""
    token_file = run_dir / TOKEN_FILE
    try:
        token = token_file.read_text().strip()
    except OSError:
        raise Failure(
            f"no Vault token at {token_file}: is the local stack running from {run_dir} "
            "(make run, or --run-dir)?"
        ) from None
    return hvac.Client(url=f"http://{HOST}:{Ports(base_port).bao}", token=token, timeout=10)


@app.command()
def issue(
    role: Annotated[Role, typer.Option(help="the identity's role", case_sensitive=False)],
    name: Annotated[
        str, typer.Option(help="its name within the role (lower case, digits, . _ -), e.g. jd")
    ],
    out: Annotated[
        Path, typer.Option(help="directory to write tls.crt, tls.key, ca.crt", file_okay=False)
    ],
    ttl: Annotated[str, typer.Option(help="lifetime, e.g. 24h or 30m (at most 720h)")] = DEMO_TTL,
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="a DNS name or IP address the certificate serves (service role only; repeat)"
        ),
    ] = None,
    run_dir: RunDirOpt = DEFAULT_RUN_DIR,
    base_port: BasePortOpt = DEFAULT_BASE_PORT,
    json_only: JsonOpt = False,
) -> None:
    """Issue one identity from the running local stack's Vault PKI (reached with the root token
    in RUN_DIR/LOCAL-ONLY-vault-token; local development only)."""
    try:
        who = Caller.parse(Caller(role, name).spiffe_id)
    except NotAnIdentity as exc:
        raise typer.BadParameter(str(exc), param_hint="'--name'") from None
    if host and role is not Role.SERVICE:
        raise typer.BadParameter("only a service's certificate serves", param_hint="'--host'")
    client = vault_client(run_dir, base_port)
    try:
        cert = issue_to(client, who, out, ttl=ttl, hosts=host or ())
    except requests.exceptions.RequestException:
        raise Failure(
            f"the local stack's OpenBao at {client.url} does not answer", EXIT_UNREACHABLE
        ) from None
    except pki.PkiError as exc:
        raise Failure(str(exc), EXIT_REFUSED) from None
    except OSError as exc:
        raise Failure(f"cannot write {out}: {exc.strerror}") from None
    emit(
        {
            "identity": who.spiffe_id,
            "dir": str(out),
            "serial": pki.serial_of(cert),
            "not_after": cert.not_after.isoformat(),
        }
    )
