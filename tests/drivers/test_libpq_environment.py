"""dropsafe's list of libpq environment variables agrees with libpq's own (PQconndefaults)."""

import psycopg.pq

from dropsafe._drivers import _LIBPQ_ENVIRONMENT, _LIBPQ_KEYS


def test_every_environment_variable_libpq_reads_for_our_keys_is_known():
    from_libpq = {
        option.keyword.decode(): option.envvar.decode()
        for option in psycopg.pq.Conninfo.get_defaults()
        if option.envvar and option.keyword.decode() in _LIBPQ_KEYS
    }
    assert from_libpq == _LIBPQ_ENVIRONMENT
