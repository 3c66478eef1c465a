"""One settings object per service, read from environment variables.

A missing required variable stops the service at start-up with a message naming it; nothing
starts half-configured. Names are ``SUBSIDY_*`` plus the standard ``OTEL_*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError


class SettingsError(RuntimeError):
    """A required setting is missing or malformed; the message names the variable."""


def _get(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name, default)
    if value is None or value == "":
        raise SettingsError(f"missing required environment variable {name}")
    return value


def _with_password(url: str, password: str) -> str:
    """``url`` with ``password`` for its user, percent-encoded (a password may hold any of
    ``@ / : # ?``), unless the URL names no user or already carries a password."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Never echo the URL: it may carry credentials.
        raise SettingsError("SUBSIDY_DATABASE_URL is not a valid database URL") from None
    if parsed.username is None or parsed.password is not None:
        return url
    return parsed.set(password=password).render_as_string(hide_password=False)


@dataclass(frozen=True)
class Settings:
    """Everything a service process needs to start; see docs/operations.md for each name."""

    service: str
    grpc_listen: str
    database_url: str
    nats_url: str
    vault_addr: str
    vault_token: str | None
    vault_k8s_role: str | None
    vault_transit_mount: str = "transit"
    metrics_listen: str | None = None
    log_level: str = "INFO"
    log_file: Path | None = None
    trace_file: Path | None = None
    peers: Mapping[str, str] = field(default_factory=dict)
    reservation_timeout_s: int = 900
    # How long a reservation attempt may sit between locking the qualification and the hold
    # before the ledger's sweeper treats it as abandoned (its process died) and refuses it.
    abandon_after_s: int = 60
    rpc_deadline_s: float = 5.0

    @classmethod
    def from_env(
        cls, service: str, *, peers: tuple[str, ...] = (), env: Mapping[str, str] | None = None
    ) -> Settings:
        """Read the settings of ``service``; ``peers`` names the other services it calls."""
        env = os.environ if env is None else env
        token = env.get("SUBSIDY_VAULT_TOKEN") or None
        token_file = env.get("SUBSIDY_VAULT_TOKEN_FILE")
        if not token and token_file:
            token = Path(token_file).read_text().strip()
        role = env.get("SUBSIDY_VAULT_K8S_ROLE") or None
        if not token and not role:
            raise SettingsError(
                "missing required environment variable SUBSIDY_VAULT_TOKEN "
                "(or SUBSIDY_VAULT_TOKEN_FILE, or SUBSIDY_VAULT_K8S_ROLE in a cluster)"
            )
        database_url = _get(env, "SUBSIDY_DATABASE_URL")
        password_file = env.get("SUBSIDY_DATABASE_PASSWORD_FILE")
        if password_file:
            database_url = _with_password(database_url, Path(password_file).read_text().strip())
        peer_addrs = {p: _get(env, f"SUBSIDY_{p.upper()}_ADDR") for p in peers}

        def _int(name: str, default: int) -> int:
            raw = env.get(name, str(default))
            try:
                return int(raw)
            except ValueError:
                raise SettingsError(f"{name} must be an integer, got {raw!r}") from None

        def _path(name: str) -> Path | None:
            raw = env.get(name)
            return Path(raw) if raw else None

        return cls(
            service=service,
            grpc_listen=_get(env, "SUBSIDY_GRPC_LISTEN"),
            database_url=database_url,
            nats_url=_get(env, "SUBSIDY_NATS_URL"),
            vault_addr=_get(env, "SUBSIDY_VAULT_ADDR"),
            vault_token=token,
            vault_k8s_role=role,
            vault_transit_mount=env.get("SUBSIDY_VAULT_TRANSIT_MOUNT", "transit"),
            metrics_listen=env.get("SUBSIDY_METRICS_LISTEN") or None,
            log_level=env.get("SUBSIDY_LOG_LEVEL", "INFO"),
            log_file=_path("SUBSIDY_LOG_FILE"),
            trace_file=_path("SUBSIDY_TRACE_FILE"),
            peers=peer_addrs,
            reservation_timeout_s=_int("SUBSIDY_RESERVATION_TIMEOUT_S", 900),
            abandon_after_s=_int("SUBSIDY_ABANDON_AFTER_S", 60),
        )
