"""Encrypted backups of the platform and their restore (``subsidyctl backup`` / ``restore``).

(Longer than the project's usual 450 lines: the archive's format, written and read, in one
place; the read-model replay is in subsidyctl/replay_check.py, the erasure register in
services/eligibility/erasures.py.)

An archive is a directory: one ``<service>.dump.enc`` per service database (``pg_dump``'s custom
format, run as the service's migration role, which owns every table) and ``manifest.json``.
Each dump is encrypted with a fresh data key Vault transit generated for this backup
(``subsidy-pii-kek``, :meth:`services.kernel.vault.Vault.new_data_key_sync`): the manifest
holds only the key as Vault wrapped it, so the archive is unreadable without Vault. A dump is
sealed in 1 MiB chunks with AES-256-GCM (as :func:`services.kernel.vault.seal`), each chunk's
associated data naming the file, the chunk's number and whether it is the last, so a chunk
moved, swapped between files or cut off does not open. The manifest lists the SHA-256 of every
file and the signed checkpoint of the audit log taken just before the dumps, and carries an
HMAC under a key derived from the data key, so it cannot be edited without Vault either.

What is not in an archive, and why:

- JetStream. The event stores are the source of truth and every event on the bus came from one
  of them; a consumer's position is its ``handled_events`` rows, in its own database. A restore
  therefore resets each store's outbox relay to the beginning: every stored event is published
  again, and each consumer drops those its restored ``handled_events`` say it handled. Events
  that were on the bus but not yet handled when the dumps were taken are delivered then.
- Vault. Its keys (the persons' key-encryption key, the blind index, the tree-head key) are
  backed up with Vault's own snapshots; without them neither the archive nor the persons' data
  opens.

Crypto-shredding: a backup holds what the databases held, so a person erased *after* the backup
was taken still has their wrapped data key in it, and no ``ConsumerErased``. A restore deletes
the key of every consumer in the erasure register (Vault KV, outside every database:
:mod:`services.eligibility.erasures`), of every consumer whose ``ConsumerErased`` event is in
the restored eligibility store, and of every consumer named with ``--erased``; eligibility, when
it starts, records the missing erasures through its own pipeline.

After the log's checks, every read model is replayed from the restored events by the services'
own projections and compared with the restored one (:mod:`subsidyctl.replay_check`).

Restoring into a new PostgreSQL cluster: each event's ``tx_id`` is the writing transaction's id
in the old cluster, which the new cluster has not reached; the stores read events in
``(tx_id, position)`` order and never past the oldest running transaction, so a restore sets
every restored event's ``tx_id`` to 1 (their order is then their position, as appended) and
lets new transactions follow them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from services.audit.verify import LogAudit, Problem, Row
from services.eligibility import erasures
from services.invariants import EventDigest, LogStoreMismatch, check_log_matches_stores
from services.kernel import vault
from services.kernel.contract.checkpoint import (
    Checkpoint,
    NoteInvalid,
    VerifierKey,
    open_checkpoint,
    split_note,
)
from services.kernel.events import Envelope, payload_of
from subsidy.v1 import events_pb2 as ev

from .replay_check import check_read_models
from .stack.postgres import SERVICE_DATABASES, pg_bin_dir

FORMAT = 1
MANIFEST = "manifest.json"
MAGIC = b"SUBSIDY-BACKUP-1\n"
CHUNK = 1 << 20
DATED = re.compile(r"\d{8}T\d{6}Z")
ERASED_TYPE = ev.ConsumerErased.DESCRIPTOR.full_name
Progress = Callable[[str, int, int], None]


class BackupError(RuntimeError):
    """The archive or a database refused: the message names the file or the database."""


@dataclass(frozen=True)
class Database:
    """One service's database and the role a backup or restore logs in as (its migration role,
    which owns the database and every table in it)."""

    name: str  # the service's: names its file in the archive
    host: str
    port: int
    user: str
    password: str
    dbname: str = ""  # the database's own name, when it is not the service's (a deployment)
    sslmode: str = ""  # libpq's; empty: libpq's default (the local stack)

    @property
    def database(self) -> str:
        return self.dbname or self.name

    def conninfo(self) -> str:
        extra = {"sslmode": self.sslmode} if self.sslmode else {}
        return make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.database,
            **extra,
        )

    @classmethod
    def from_url(cls, service: str, url: str, password: str) -> Database:
        """``service``'s database from a URL as the services' settings write it
        (``postgresql+psycopg://USER@HOST:PORT/DBNAME?sslmode=...``) and its role's password."""
        try:
            parsed = make_url(url)
        except ArgumentError:
            # Never echo the URL: it may carry credentials.
            raise BackupError(f"the {service} database URL is not a valid URL") from None
        if not (parsed.host and parsed.username and parsed.database):
            raise BackupError(f"the {service} database URL needs a user, a host and a database")
        sslmode = parsed.query.get("sslmode", "")
        return cls(
            service,
            parsed.host,
            parsed.port or 5432,
            parsed.username,
            parsed.password or password,
            dbname=parsed.database,
            sslmode=sslmode if isinstance(sslmode, str) else sslmode[0],
        )


@dataclass(frozen=True)
class Archived:
    """The checkpoint a backup holds, as the manifest records it."""

    note: str
    tree_size: int
    root_hex: str


# -- encryption ------------------------------------------------------------------------------
def _manifest_key(data_key: bytes) -> bytes:
    """A separate key for the manifest's HMAC (never the same key for two algorithms)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"subsidy-backup-manifest")
    return hkdf.derive(data_key)


def _aad(name: str, index: int, last: bool) -> bytes:
    return f"{name}\x00{index}\x00{int(last)}".encode()


def encrypt_file(key: bytes, name: str, source: Path, target: Path) -> None:
    """``source`` sealed chunk by chunk into ``target`` (see the module's docstring)."""
    aes = AESGCM(key)
    size = source.stat().st_size
    chunks = max(1, -(-size // CHUNK))
    with source.open("rb") as src, _private(target) as out:
        out.write(MAGIC)
        for index in range(chunks):
            plain = src.read(CHUNK)
            nonce = os.urandom(12)
            sealed = aes.encrypt(nonce, plain, _aad(name, index, index == chunks - 1))
            out.write(len(sealed).to_bytes(4, "big") + nonce + sealed)


def decrypt_file(key: bytes, name: str, source: Path, target: Path) -> None:
    """Open a file :func:`encrypt_file` sealed; :class:`BackupError` naming it if any chunk is
    changed, missing or out of place."""
    aes = AESGCM(key)
    with source.open("rb") as src, _private(target) as out:
        if src.read(len(MAGIC)) != MAGIC:
            raise BackupError(f"{name}: not a file subsidyctl backup encrypted")
        index = 0
        while header := src.read(4):
            sealed_len = int.from_bytes(header, "big")
            nonce, sealed = src.read(12), src.read(sealed_len)
            last = not src.peek(1)  # the next chunk, if any, without reading it
            try:
                out.write(aes.decrypt(nonce, sealed, _aad(name, index, last)))
            except Exception:
                raise BackupError(
                    f"{name}: chunk {index} does not decrypt (changed or cut)"
                ) from None
            index += 1
        if index == 0:
            raise BackupError(f"{name}: empty")


@contextlib.contextmanager
def _private(path: Path) -> Iterator[BinaryIO]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        yield fh


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "hmac_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# -- PostgreSQL -------------------------------------------------------------------------------
@contextlib.contextmanager
def _passfile(db: Database) -> Iterator[dict[str, str]]:
    """libpq's environment for ``db``: the password in a 0600 file, never on a command line."""
    scratch = Path(tempfile.mkdtemp(prefix="subsidy-backup-"))
    try:
        passfile = scratch / "pgpass"
        esc = db.password.replace("\\", "\\\\").replace(":", "\\:")
        with _private(passfile) as fh:
            fh.write(f"{db.host}:{db.port}:{db.database}:{db.user}:{esc}\n".encode())
        # Only the CA bundle of libpq's own variables passes (a deployment verifies the server).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if "PGSSLROOTCERT" in os.environ:
            env["PGSSLROOTCERT"] = os.environ["PGSSLROOTCERT"]
        if db.sslmode:
            env["PGSSLMODE"] = db.sslmode
        yield env | {"PGPASSFILE": str(passfile), "LC_ALL": "C"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(argv: list[str], env: dict[str, str], what: str) -> None:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise BackupError(f"{what} failed ({result.returncode}): {result.stderr.strip()[-800:]}")


def pg_dump(db: Database, target: Path) -> None:
    """``db`` in pg_dump's custom format (one consistent snapshot of that database)."""
    with _passfile(db) as env:
        _run(
            [
                str(pg_bin_dir() / "pg_dump"),
                *("-h", db.host, "-p", str(db.port), "-U", db.user, "-d", db.database),
                "--format=custom",
                "--no-owner",  # restored as the target's migration role, which then owns it
                "--no-password",
                f"--file={target}",
            ],
            env,
            f"pg_dump of {db.name}",
        )


def pg_restore(db: Database, source: Path) -> None:
    with _passfile(db) as env:
        _run(
            [
                str(pg_bin_dir() / "pg_restore"),
                *("-h", db.host, "-p", str(db.port), "-U", db.user, "-d", db.database),
                "--no-owner",
                "--exit-on-error",
                "--single-transaction",  # all of a database or nothing of it
                "--no-password",
                str(source),
            ],
            env,
            f"pg_restore of {db.name}",
        )


def tables_in(db: Database) -> int:
    """How many tables, views and sequences the database's public schema holds."""
    with psycopg.connect(db.conninfo(), connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')"
        ).fetchone()
    return int(row[0]) if row else 0


def _empty_schema(db: Database) -> None:
    """--force: drop everything in the public schema (the migration role owns it)."""
    with psycopg.connect(db.conninfo(), connect_timeout=5, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public AUTHORIZATION pg_database_owner")


# -- backup -----------------------------------------------------------------------------------
def backup(
    databases: Sequence[Database],
    keys: vault.Vault,
    checkpoint_note: str,
    out: Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write an archive of ``databases`` into the new or empty directory ``out``; returns the
    manifest. ``checkpoint_note`` is the audit log's signed checkpoint, taken before the
    dumps, so the dumped log holds at least the entries it signs."""
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty: a backup goes into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    cp = Checkpoint.parse(split_note(checkpoint_note)[0])
    data_key, wrapped = keys.new_data_key_sync()
    files: dict[str, dict[str, Any]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="subsidy-backup-"))
    try:
        total = len(databases)
        for done, db in enumerate(databases):
            if progress:
                progress("DUMP", done, total)
            plain = scratch / f"{db.name}.dump"
            pg_dump(db, plain)
            name = f"{db.name}.dump.enc"
            encrypt_file(data_key, name, plain, out / name)
            plain.unlink()
            files[name] = {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
        if progress:
            progress("DUMP", total, total)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wrapped_key": wrapped.ciphertext,
        "cipher": "AES-256-GCM, 1 MiB chunks",
        "databases": [db.name for db in databases],
        "files": files,
        "checkpoint": {"note": checkpoint_note, "tree_size": cp.size, "root_hex": cp.root.hex()},
        "jetstream": "not archived: every store's relay republishes it at restore",
    }
    manifest["hmac_sha256"] = hmac.new(
        _manifest_key(data_key), _canonical(manifest), hashlib.sha256
    ).hexdigest()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def stored_checkpoint(audit: Database) -> str:
    """The newest signed checkpoint the audit service stored (it signs one every
    ``SUBSIDY_CHECKPOINT_INTERVAL_S`` while the log grows): what a backup without a client
    certificate for the audit service (the chart's CronJob) archives."""
    with psycopg.connect(audit.conninfo(), connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT note FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1"
        ).fetchone()
    if row is None:
        raise BackupError("the audit log has no signed checkpoint yet: nothing to back up against")
    return str(row[0])


def dated(root: Path, now: datetime | None = None) -> Path:
    """A new archive directory under ``root`` named by the UTC time (``20261201T023000Z``)."""
    return root / (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` dated archives under ``root``; returns the deleted.
    Only directories named as :func:`dated` names them and holding a manifest are touched."""
    archives = sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and DATED.fullmatch(p.name) and (p / MANIFEST).is_file()
    )
    old = archives[: max(0, len(archives) - keep)]
    for path in old:
        shutil.rmtree(path)
    return old


# -- restore ----------------------------------------------------------------------------------
def read_manifest(archive: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((archive / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{archive / MANIFEST}: missing; is {archive} a backup?") from None
    except ValueError as exc:
        raise BackupError(f"{archive / MANIFEST}: not JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{archive / MANIFEST}: format {manifest.get('format')!r}, not {FORMAT}")
    return manifest


def check_checksums(archive: Path, manifest: Mapping[str, Any], progress: Progress | None) -> None:
    """Every file the manifest lists is there with its SHA-256; nothing is read further first."""
    files: Mapping[str, Mapping[str, Any]] = manifest["files"]
    for done, (name, meta) in enumerate(sorted(files.items())):
        if progress:
            progress("CHECK", done, len(files))
        path = archive / name
        if not path.is_file():
            raise BackupError(f"{path}: missing from the archive")
        if sha256_file(path) != meta["sha256"]:
            raise BackupError(f"{path}: its SHA-256 is not the manifest's: the file is corrupt")
    if progress:
        progress("CHECK", len(files), len(files))


@dataclass
class Restored:
    """What a restore did and found."""

    databases: list[str] = field(default_factory=list)
    keys_shredded: int = 0
    tree_size: int = 0
    root_hex: str = ""
    entries: int = 0
    root_matches_checkpoint: bool = False
    signature_ok: bool = False
    store_events: dict[str, int] = field(default_factory=dict)
    unlogged_events: int = 0
    erasures_registered: int = 0
    read_models_ok: bool = False
    read_model_events: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.root_matches_checkpoint
            and self.signature_ok
            and self.read_models_ok
            and not self.problems
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "databases": self.databases,
            "tree_size": self.tree_size,
            "root_hex": self.root_hex,
            "root_matches_checkpoint": self.root_matches_checkpoint,
            "signature_ok": self.signature_ok,
            "entries": self.entries,
            "store_events_by_service": self.store_events,
            "unlogged_events": self.unlogged_events,
            "keys_shredded": self.keys_shredded,
            "erasures_registered": self.erasures_registered,
            "read_models_match_replay": self.read_models_ok,
            "read_model_events_replayed": self.read_model_events,
            "differences": [p.as_json() for p in self.problems],
        }


def restore(
    archive: Path,
    databases: Mapping[str, Database],
    keys: vault.Vault,
    verifier_keys: Sequence[VerifierKey],
    *,
    force: bool = False,
    erased: Sequence[str] = (),
    progress: Progress | None = None,
    before_change: Callable[[], None] | None = None,
) -> Restored:
    """Restore ``archive`` into ``databases`` (by name), then verify it (:func:`verify`) and
    replay every read model (:mod:`subsidyctl.replay_check`).

    Nothing is changed until every checksum matched, the manifest's HMAC checked, every file
    decrypted, and every target found empty (or ``force``); ``before_change`` is called then
    (a running local stack's services are stopped there)."""
    manifest = read_manifest(archive)
    check_checksums(archive, manifest, progress)
    try:
        data_key = keys.unwrap_sync(vault.WrappedKey(manifest["wrapped_key"]))
    except vault.VaultUnavailable as exc:
        raise BackupError(
            f"{archive / MANIFEST}: Vault does not open its data key: {exc}"
        ) from None
    mac = hmac.new(_manifest_key(data_key), _canonical(manifest), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, str(manifest.get("hmac_sha256", ""))):
        raise BackupError(f"{archive / MANIFEST}: its HMAC does not match: the manifest was edited")
    names: list[str] = list(manifest["databases"])
    if missing := [n for n in names if n not in databases]:
        raise BackupError(f"no target database given for {', '.join(missing)}")
    for name in names:
        if (n := tables_in(databases[name])) and not force:
            raise BackupError(
                f"database {name} is not empty ({n} tables); restore into an empty one, or "
                "pass --force to replace it"
            )
    out = Restored(databases=names)
    scratch = Path(tempfile.mkdtemp(prefix="subsidy-restore-"))
    try:
        for done, name in enumerate(names):
            if progress:
                progress("DECRYPT", done, len(names))
            decrypt_file(data_key, f"{name}.dump.enc", archive / f"{name}.dump.enc", scratch / name)
        if progress:
            progress("DECRYPT", len(names), len(names))
        if before_change:
            before_change()
        for done, name in enumerate(names):
            if progress:
                progress("RESTORE", done, len(names))
            db = databases[name]
            if force:
                _empty_schema(db)
            pg_restore(db, scratch / name)
            _rebase_store(db)
        if progress:
            progress("RESTORE", len(names), len(names))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if "eligibility" in databases and "eligibility" in names:
        try:
            registered = erasures.registered_sync(keys)
        except vault.VaultUnavailable as exc:
            raise BackupError(f"the erasure register ({erasures.REGISTER}): {exc}") from None
        out.erasures_registered = len(registered)
        out.keys_shredded = reapply_erasures(databases["eligibility"], [*erased, *registered])
    verify(databases, manifest, verifier_keys, out, progress)
    if progress:
        progress("REPLAY", 0, 1)
    found, out.read_model_events = asyncio.run(check_read_models({n: databases[n] for n in names}))
    out.read_models_ok = not found
    out.problems += found
    if progress:
        progress("REPLAY", 1, 1)
    return out


def _rebase_store(db: Database) -> None:
    """A restored store's events, readable by the new cluster, and republished by its relay
    (see the module's docstring)."""
    with psycopg.connect(db.conninfo(), connect_timeout=5) as conn:
        conn.execute("UPDATE events SET tx_id = '1'::xid8")
        conn.execute("DELETE FROM checkpoints")


def reapply_erasures(db: Database, also: Sequence[str] = ()) -> int:
    """Delete the wrapped data key of every erased consumer: those with a ``ConsumerErased``
    in the store and those in ``also``; returns how many keys were deleted."""
    with psycopg.connect(db.conninfo(), connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT envelope FROM events WHERE event_type = %s", (ERASED_TYPE,)
        ).fetchall()
        consumers = set(also)
        for (data,) in rows:
            erasure = payload_of(Envelope.FromString(bytes(data)))
            assert isinstance(erasure, ev.ConsumerErased)
            consumers.add(erasure.consumer_id)
        cur = conn.execute(
            "DELETE FROM person_keys WHERE consumer_id = ANY(%s)", (sorted(consumers),)
        )
        return cur.rowcount


def _entries(db: Database, start: int, end: int | None) -> Iterator[list[Row]]:
    """The restored log's entries ``[start, end)``, a page at a time, in index order."""
    query = "SELECT idx, leaf_hash, chain_hash, envelope FROM audit_entries WHERE idx >= %s"
    args: tuple[int, ...] = (start,)
    if end is not None:
        query, args = query + " AND idx < %s", (start, end)
    with psycopg.connect(db.conninfo(), connect_timeout=5) as conn, conn.cursor("entries") as cur:
        cur.execute(query + " ORDER BY idx", args)
        while page := cur.fetchmany(1000):
            yield [(int(i), bytes(leaf), bytes(c), bytes(d)) for i, leaf, c, d in page]


def _store_digests(db: Database, service: str) -> list[EventDigest]:
    with psycopg.connect(db.conninfo(), connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT event_id, envelope, stream_id, stream_version, event_type FROM events"
        ).fetchall()
    return [
        EventDigest(service, eid, hashlib.sha256(bytes(data)).hexdigest(), sid, int(ver), etype)
        for eid, data, sid, ver, etype in rows
    ]


def verify(
    databases: Mapping[str, Database],
    manifest: Mapping[str, Any],
    verifier_keys: Sequence[VerifierKey],
    out: Restored,
    progress: Progress | None = None,
) -> None:
    """``audit verify``'s checks on the restored data, read from the databases: the archived
    checkpoint's signature, each entry's leaf and chain, the root of the first
    ``tree_size`` entries against the checkpoint's, and every restored store against the log
    (events the log lacks are only those still to be republished)."""
    archived = manifest["checkpoint"]
    try:
        cp = open_checkpoint(archived["note"], list(verifier_keys))
        out.signature_ok = True
    except NoteInvalid as exc:
        out.problems.append(Problem("signature", f"the archived checkpoint's signature: {exc}"))
        cp = Checkpoint.parse(split_note(archived["note"])[0])
    out.tree_size, out.root_hex = cp.size, cp.root.hex()
    state = LogAudit(0, digests=True)
    for page in _entries(databases["audit"], 0, cp.size):
        state.add(page)
        if progress:
            progress("VERIFY", state.size, cp.size)
    at_checkpoint = state.check_checkpoint(cp)  # the signed root, before what followed it
    out.root_matches_checkpoint = not at_checkpoint and not state.problems
    out.problems += at_checkpoint
    for page in _entries(databases["audit"], cp.size, None):  # logged after the checkpoint
        state.add(page)
    out.entries = state.size
    out.problems[:0] = state.problems
    stored = [d for name in manifest["databases"] for d in _store_digests(databases[name], name)]
    try:
        out.store_events = check_log_matches_stores(stored, state.digests, skipped=state.skipped)
    except LogStoreMismatch as exc:
        if not exc.only_unlogged:
            out.problems += [Problem("stores", line) for line in [*exc.counts, *exc.shown]]
        else:
            out.unlogged_events = len(exc.events)
            out.store_events = {name: 0 for name in manifest["databases"]}
            for d in stored:
                out.store_events[d.service] += 1
    if progress:
        progress("VERIFY", state.size, max(state.size, cp.size))


def migration_databases(
    host: str, port: int, passwords: Mapping[str, str], names: Sequence[str] = SERVICE_DATABASES
) -> dict[str, Database]:
    """Each service database as its migration role."""
    return {n: Database(n, host, port, f"{n}_migration", passwords[n]) for n in names}
