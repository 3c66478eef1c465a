"""The archive's file encryption (subsidyctl/backup.py): what comes in goes out, and a chunk
changed, cut off, reordered or moved to another file's name does not open."""

from __future__ import annotations

import os
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
