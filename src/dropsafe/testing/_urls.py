"""How a client reaches a bench server: the one SQLAlchemy URL builder, and TLS per driver."""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING, get_args
from urllib.parse import quote

from dropsafe._drivers import DriverName, driver_named
from dropsafe._errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

__all__ = [
    "DRIVERS",
    "Driver",
    "bracketed",
    "make_certificate",
    "sqlalchemy_url",
    "tls_connect_args",
    "url_query",
]

Driver = DriverName
DRIVERS: tuple[Driver, ...] = get_args(DriverName)


def sqlalchemy_url(
    driver: Driver,
    *,
    password: str,
    address: str,
    database: str,
    params: Mapping[str, str],
    tls: bool,
    user: str = "postgres",
    hosts: Sequence[tuple[str, int]] = (),
) -> str:
    """Return ``postgresql+driver://user:password@address/database?params``, TLS asked for.

    ``address`` is ``host:port`` (bracketed for IPv6); with ``hosts`` it is '' and the
    servers come as ``host=`` parameters, first, then ``target_session_attrs=read-write``
    unless ``params`` says otherwise (connections go to whichever server is the primary).
    Every part is quoted: a database named "postgres?sslmode=disable" must not turn TLS off.
    The URL carries the password: treat it as a secret.
    """
    if driver not in DRIVERS:
        raise ConfigurationError(f"driver must be one of {', '.join(DRIVERS)}: {driver!r}")
    query = dict(params)
    if hosts:
        listed = "&".join(
            "host=" + quote(bracketed(host), safe="[]:") + f":{port}" for host, port in hosts
        )
        query.setdefault("target_session_attrs", "read-write")
        address = ""
    if tls:
        for key, value in _tls_url_params(driver).items():
            query.setdefault(key, value)
    userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}"
    path = quote(database, safe="")
    text = f"postgresql+{driver}://{userinfo}@{address}/{path}"
    if hosts:
        return f"{text}?{listed}&{url_query(query)[1:]}"
    return text + url_query(query)


def _tls_url_params(driver: Driver) -> dict[str, str]:
    """Return the URL parameters that make ``driver`` insist on TLS (none for pg8000)."""
    return dict(driver_named(driver).tls.url_parameters)


def tls_connect_args(driver: Driver, ca_file: Path) -> dict[str, object]:
    """Return the ``connect_args`` that give ``driver`` TLS where its URL cannot (pg8000)."""
    return driver_named(driver).tls_connect_args(str(ca_file))


def bracketed(host: str) -> str:
    """Return ``host`` as a URL's host part: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def url_query(query: Mapping[str, str]) -> str:
    """Return ``?key=value&...`` with keys and values percent-encoded ('' when empty)."""
    if not query:
        return ""
    return "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query.items())


def make_certificate(cert_file: Path, key_file: Path) -> None:
    """Write a self-signed certificate for localhost (valid a week) and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigurationError(
            "TLS needs the openssl program (apt-get install openssl), or pass tls=False"
        )
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key_file),
            "-out",
            str(cert_file),
            "-days",
            "7",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
