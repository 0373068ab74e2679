"""A cached initdb: one cluster made per process, copied for every further server.

initdb is most of a server's start (it runs a bootstrap and a few thousand statements). A copy
of a cluster initdb made earlier in this process, given a system identifier of its own (the
identity dropsafe's commit resolution compares: copies must not look like one cluster), is the
same as a fresh one but for its timestamps. The superuser's password is the one thing that
differs per server: the template's is thrown away, and each copy gets its own once it runs
(`password_statement`), over the Unix socket only its owner enters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dropsafe.testing._runtime import ServerError, track

if TYPE_CHECKING:
    from dropsafe.testing._binaries import PostgresBinaries
    from dropsafe.testing._runtime import Owner

__all__ = ["copy_template", "initdb", "password_statement"]

_SCRAM_ITERATIONS = 4096
# ControlFileData ends with its CRC; where depends on the version, so it is found by value.
_CONTROL_CRC_SEARCH = range(16, 4096, 4)
_TEMPLATES: dict[tuple[str, int, Owner, str], Path] = {}
_TEMPLATES_LOCK = threading.Lock()


class _Template:
    """Owns one template's folder: removed at exit, on SIGTERM, or by a later run's sweep."""


_KEEP: list[_Template] = []  # alive until exit, when their finalizers remove the folders


def initdb(
    binaries: PostgresBinaries, owner: Owner, data_dir: Path, *, password: str, auth: str
) -> None:
    """Run initdb into the empty ``data_dir`` as ``owner``, ``password`` for ``postgres``."""
    password_file = data_dir.parent / f"password-{secrets.token_hex(4)}"
    password_file.touch(mode=0o600)
    password_file.write_text(password + "\n")
    owner.give(password_file)
    try:
        owner.run(
            [
                binaries.tool("initdb"),
                *("-D", str(data_dir), "-U", "postgres", "-A", auth),
                f"--pwfile={password_file}",
                *("-E", "UTF8", "--locale=C", "--no-sync"),
            ],
            cwd=data_dir.parent,
            what="initdb",
        )
    finally:
        password_file.unlink()


def copy_template(binaries: PostgresBinaries, owner: Owner, data_dir: Path, *, auth: str) -> bool:
    """Fill the empty ``data_dir`` with a copy of this process's template cluster.

    Returns False, doing nothing, where it cannot (no ``pg_resetwal`` beside initdb): the
    caller then runs initdb. A copy's superuser has no password anyone knows until
    `password_statement` is run on it.
    """
    if not Path(binaries.tool("pg_resetwal")).is_file():
        return False
    template = _template(binaries, owner, auth)
    owner.run(["cp", "-a", f"{template}/.", str(data_dir)], cwd=data_dir.parent, what="copy")
    _give_new_system_identifier(data_dir / "global" / "pg_control")
    # pg_resetwal writes WAL that carries the new identifier (each WAL page header does).
    owner.run(
        [binaries.tool("pg_resetwal"), "-D", str(data_dir)],
        cwd=data_dir.parent,
        what="pg_resetwal",
    )
    return True


def password_statement(password: str, *, auth: str) -> str:
    """Return ``ALTER ROLE postgres PASSWORD`` with ``password`` already hashed.

    Hashed here, so that the text never reaches the server, nor its log (a test's settings
    may log every statement).
    """
    if auth == "md5":
        salted = (password + "postgres").encode()
        verifier = "md5" + hashlib.md5(salted, usedforsecurity=False).hexdigest()
    else:
        salt = secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _SCRAM_ITERATIONS)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        encode = base64.b64encode
        verifier = (
            f"SCRAM-SHA-256${_SCRAM_ITERATIONS}:{encode(salt).decode()}"
            f"${encode(stored_key).decode()}:{encode(server_key).decode()}"
        )
    return f"ALTER ROLE postgres PASSWORD '{verifier}'"


def _template(binaries: PostgresBinaries, owner: Owner, auth: str) -> Path:
    key = (str(binaries.bin_dir), binaries.major_version, owner, auth)
    with _TEMPLATES_LOCK:
        if key not in _TEMPLATES:
            keeper = _Template()
            base_dir = owner.make_base_dir("initdb-")
            track(keeper, [], base_dir)
            data_dir = base_dir / "data"
            data_dir.mkdir(mode=0o700)
            owner.give(data_dir)
            # A password no one keeps: each copy gets its own.
            initdb(binaries, owner, data_dir, password=secrets.token_urlsafe(24), auth=auth)
            # Its WAL goes: each copy's pg_resetwal writes new WAL anyway (16 MB fewer to copy).
            owner.run(
                ["find", str(data_dir / "pg_wal"), "-maxdepth", "1", "-type", "f", "-delete"],
                cwd=base_dir,
                what="removing the template's WAL",
            )
            _KEEP.append(keeper)
            _TEMPLATES[key] = data_dir
        return _TEMPLATES[key]


def _give_new_system_identifier(control_file: Path) -> None:
    """Write a new system identifier into ``pg_control`` (its first field) and its CRC."""
    fd = os.open(control_file, os.O_RDWR | os.O_NOFOLLOW)
    try:
        data = bytearray(os.pread(fd, 8192, 0))
        offset = _crc_offset(data)
        # As PostgreSQL makes one: the time in seconds and microseconds, and 12 random bits.
        now = time.time_ns() // 1000
        identifier = (now // 1_000_000) << 32 | (now % 1_000_000) << 12 | secrets.randbits(12)
        struct.pack_into("=Q", data, 0, identifier)
        struct.pack_into("=I", data, offset, _crc32c(bytes(data[:offset])))
        os.pwrite(fd, bytes(data[: offset + 4]), 0)
    finally:
        os.close(fd)


def _crc_offset(data: bytearray) -> int:
    crc = 0xFFFFFFFF
    position = 0
    for offset in _CONTROL_CRC_SEARCH:
        crc = _crc32c_update(crc, data[position:offset])
        position = offset
        if crc ^ 0xFFFFFFFF == struct.unpack_from("=I", data, offset)[0]:
            return offset
    raise ServerError("pg_control: no CRC found where one was expected")


def _crc32c(data: bytes) -> int:
    return _crc32c_update(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def _crc32c_update(crc: int, data: bytes | bytearray) -> int:
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def _crc32c_table() -> list[int]:
    table = []
    for index in range(256):
        crc = index
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()
