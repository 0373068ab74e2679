"""How a client reaches a bench server: the one URL builder, the url every server shares, TLS."""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING, Protocol, get_args
from urllib.parse import quote

from dropsafe._drivers import DriverName, driver_named
from dropsafe._errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

__all__ = [
    "DRIVERS",
    "Driver",
    "LoginServer",
    "Reachable",
    "bracketed",
    "make_certificate",
    "sqlalchemy_url",
    "tls_connect_args",
    "url_query",
]

Driver = DriverName
DRIVERS: tuple[Driver, ...] = get_args(DriverName)


class LoginServer(Protocol):
    """What clients log in to a bench server with: its password, and its certificate for TLS."""

    @property
    def password(self) -> str:
        """The password of the server's superuser."""

    @property
    def ca_file(self) -> Path:
        """The certificate clients verify the server with."""


class Reachable:
    """A bench service clients reach over TCP: `PostgresServer`, and `PgBouncer` in front of one.

    One ``url`` and ``connect_args`` for both (the reference pages show them on each class).
    """

    host: str
    port: int
    tls: bool

    def _login_server(self) -> LoginServer:
        """Return the server whose password and certificate clients use."""
        raise NotImplementedError

    def url(
        self,
        driver: Driver = "psycopg2",
        *,
        database: str = "postgres",
        user: str = "postgres",
        password: str | None = None,
        **params: str,
    ) -> str:
        """Return a SQLAlchemy URL for ``driver`` that reaches this server over TCP.

        The URL carries ``password`` (default: the server's own), so treat it as a secret.
        With TLS on, the URL asks for it (``sslmode=require``; ``ssl=require`` for asyncpg).
        pg8000 takes TLS through ``connect_args(driver)`` instead of the URL. A `PgBouncer`'s
        URL reaches its server through it.
        """
        return sqlalchemy_url(
            driver,
            user=user,
            password=self._login_server().password if password is None else password,
            address=f"{bracketed(self.host)}:{self.port}",
            database=database,
            params=params,
            tls=self.tls,
        )

    def connect_args(self, driver: Driver = "psycopg2") -> dict[str, object]:
        """Extra ``connect_args`` a driver needs for this server (TLS for pg8000)."""
        return tls_connect_args(driver, self._login_server().ca_file) if self.tls else {}


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
