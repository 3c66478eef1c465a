"""The archive's file encryption (subsidyctl/backup.py): what comes in goes out, and a chunk
changed, cut off, reordered or moved to another file's name does not open."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from subsidyctl import backup
from subsidyctl.backup import CHUNK, MAGIC, BackupError, decrypt_file, encrypt_file

KEY = bytes(range(32))


def _sealed(tmp_path: Path, size: int, name: str = "ledger.dump.enc") -> tuple[bytes, Path]:
    plain = os.urandom(size)
    (tmp_path / "plain").write_bytes(plain)
    encrypt_file(KEY, name, tmp_path / "plain", tmp_path / name)
    return plain, tmp_path / name


def _chunks(data: bytes) -> list[bytes]:
    out, at = [], len(MAGIC)
    while at < len(data):
        n = 4 + 12 + int.from_bytes(data[at : at + 4], "big")
        out.append(data[at : at + n])
        at += n
    return out


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 17])
def test_round_trip(tmp_path: Path, size: int) -> None:
    plain, sealed = _sealed(tmp_path, size)
    if size >= 64:  # the clear text is nowhere in the file (shorter ones could occur by chance)
        assert plain[:64] not in sealed.read_bytes()
    decrypt_file(KEY, sealed.name, sealed, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == plain


def test_a_changed_byte_names_the_file_and_chunk(tmp_path: Path) -> None:
    _, sealed = _sealed(tmp_path, 3 * CHUNK)
    data = bytearray(sealed.read_bytes())
    data[len(MAGIC) + CHUNK + 100] ^= 1  # inside the second chunk
    sealed.write_bytes(bytes(data))
    with pytest.raises(BackupError, match=r"^ledger\.dump\.enc: chunk 1 does not decrypt"):
        decrypt_file(KEY, sealed.name, sealed, tmp_path / "out")


def test_a_file_cut_after_a_whole_chunk_does_not_open(tmp_path: Path) -> None:
    _, sealed = _sealed(tmp_path, 2 * CHUNK + 5)
    chunks = _chunks(sealed.read_bytes())
    assert len(chunks) == 3
    sealed.write_bytes(MAGIC + chunks[0] + chunks[1])  # the last chunk gone
    with pytest.raises(BackupError, match="chunk 1 does not decrypt"):
        decrypt_file(KEY, sealed.name, sealed, tmp_path / "out")


def test_reordered_chunks_do_not_open(tmp_path: Path) -> None:
    _, sealed = _sealed(tmp_path, 2 * CHUNK + 5)
    c = _chunks(sealed.read_bytes())
    sealed.write_bytes(MAGIC + c[1] + c[0] + c[2])
    with pytest.raises(BackupError, match="chunk 0 does not decrypt"):
        decrypt_file(KEY, sealed.name, sealed, tmp_path / "out")


def test_a_file_renamed_to_another_database_does_not_open(tmp_path: Path) -> None:
    _, sealed = _sealed(tmp_path, 10, name="catalog.dump.enc")
    with pytest.raises(BackupError, match=r"^ledger\.dump\.enc: chunk 0"):
        decrypt_file(KEY, "ledger.dump.enc", sealed, tmp_path / "out")


def test_another_key_does_not_open(tmp_path: Path) -> None:
    _, sealed = _sealed(tmp_path, 10)
    with pytest.raises(BackupError, match="chunk 0 does not decrypt"):
        decrypt_file(bytes(32), sealed.name, sealed, tmp_path / "out")


def test_the_manifest_hmac_covers_every_field_but_itself() -> None:
    manifest = {"format": 1, "files": {"a": {"sha256": "00"}}, "hmac_sha256": "x"}
    edited = {**manifest, "files": {"a": {"sha256": "01"}}}
    assert backup._canonical(manifest) != backup._canonical(edited)
    assert backup._canonical(manifest) == backup._canonical({**manifest, "hmac_sha256": "y"})


# -- a deployment's databases, dated archives ------------------------------------------------
def test_a_database_url_as_the_services_settings_write_it() -> None:
    db = backup.Database.from_url(
        "ledger",
        "postgresql+psycopg://subsidy_ledger_migration@pg.db.svc:5433/subsidy_ledger"
        "?sslmode=verify-full",
        "s3cr:t@",
    )
    assert (db.name, db.database, db.host, db.port) == (
        "ledger",
        "subsidy_ledger",
        "pg.db.svc",
        5433,
    )
    assert (db.user, db.password, db.sslmode) == (
        "subsidy_ledger_migration",
        "s3cr:t@",
        "verify-full",
    )
    assert "sslmode=verify-full" in db.conninfo() and "dbname=subsidy_ledger" in db.conninfo()
    local = backup.Database.from_url("audit", "postgresql+psycopg://a@h/audit", "pw")
    assert (local.port, local.sslmode) == (5432, "")


@pytest.mark.parametrize(
    "url", ["not a url", "postgresql+psycopg://pg.db.svc/x", "postgresql+psycopg://u@h"]
)
def test_a_database_url_without_user_host_or_database_is_refused_unechoed(url: str) -> None:
    with pytest.raises(BackupError, match="the catalog database URL") as refused:
        backup.Database.from_url("catalog", url, "pw")
    assert url not in str(refused.value)


def test_prune_keeps_the_newest_dated_archives_only(tmp_path: Path) -> None:
    start = datetime(2026, 12, 1, 2, 30, tzinfo=UTC)
    made = []
    for day in range(4):
        archive = backup.dated(tmp_path, start + timedelta(days=day))
        archive.mkdir()
        (archive / backup.MANIFEST).write_text("{}")
        made.append(archive)
    assert made[0].name == "20261201T023000Z"
    (tmp_path / "20261101T000000Z").mkdir()  # no manifest: not an archive, left alone
    (tmp_path / "drill").mkdir()
    (tmp_path / "drill" / backup.MANIFEST).write_text("{}")  # not dated: left alone
    assert backup.prune(tmp_path, 2) == made[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["20261101T000000Z", "drill", made[2].name, made[3].name]
    )
    assert backup.prune(tmp_path, 2) == []
