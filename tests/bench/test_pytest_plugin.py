"""The pytest plugin, as a user's suite sees it once dropsafe is installed."""

import pytest

USER_TEST = """
import pytest
import sqlalchemy as sa

@pytest.mark.dropsafe_fault
def test_my_app_sees_the_cut(request, postgres_server, chaos_proxy):
    assert request.node.get_closest_marker("timeout").args == (120,)
    engine = sa.create_engine(chaos_proxy.route(postgres_server.url()))
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        chaos_proxy.cut("rst")
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(sa.text("SELECT 1"))
    engine.dispose()

@pytest.mark.dropsafe_slow
def test_markers_are_registered():
    pass
"""


# A hang guard: a user's suite in a subprocess took 75 s under two CPU burners (default 120).
@pytest.mark.timeout(300)
def test_fixtures_and_markers_reach_a_users_suite(pytester):
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


USERS_OWN_MARKERS = """
import pytest

@pytest.mark.fault
def test_mine(request):
    assert request.node.get_closest_marker("timeout") is None
"""


def test_a_users_own_fault_marker_is_left_alone(pytester):
    # dropsafe's plugin is loaded into every suite: a user's own `fault` marker is theirs.
    pytester.makepyfile(test_user=USERS_OWN_MARKERS)
    pytester.makeini("[pytest]\nmarkers =\n    fault: the user's own\n")
    result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_dropsafe_registers_no_unprefixed_marker(pytester):
    pytester.makepyfile(test_user=USERS_OWN_MARKERS)
    result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*'fault' not found in `markers` configuration option*"])
    markers = pytester.runpytest_subprocess("--markers", "-p", "no:cacheprovider").stdout.str()
    assert "@pytest.mark.dropsafe_fault" in markers
    assert "@pytest.mark.fault:" not in markers
    assert "@pytest.mark.slow:" not in markers


SESSION_SUITE = """
import pytest
import sqlalchemy as sa

N = 5  # docs/reference/testing.md's timing ran 20

PORTS = set()

@pytest.mark.parametrize("n", range(N))
def test_each_gets_a_fresh_database_on_one_server(postgres_database, n):
    engine = sa.create_engine(postgres_database.url("psycopg2"))
    with engine.begin() as conn:
        # Empty: the table another test made is not here.
        assert conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE tablename = 'mine'"
                                    )).scalar_one() == 0
        conn.execute(sa.text("CREATE TABLE mine (n int)"))
        assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == (
            postgres_database.name)
        conn.execute(sa.text("SELECT 1"))  # a session left open is ended by the DROP
    PORTS.add(postgres_database.server.port)
    assert len(PORTS) == 1
"""


def test_the_session_server_gives_each_test_a_fresh_database(pytester):
    pytester.makepyfile(test_user=SESSION_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--durations=0")
    result.assert_outcomes(passed=5)
