"""The pytest plugin, as a user's suite sees it once dropsafe is installed."""

USER_TEST = """
import pytest
import sqlalchemy as sa

@pytest.mark.fault
def test_my_app_sees_the_cut(request, postgres_server, chaos_proxy):
    assert request.node.get_closest_marker("timeout").args == (120,)
    engine = sa.create_engine(chaos_proxy.route(postgres_server.url()))
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        chaos_proxy.cut("rst")
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(sa.text("SELECT 1"))
    engine.dispose()

@pytest.mark.slow
def test_markers_are_registered():
    pass
"""


def test_fixtures_and_markers_reach_a_users_suite(pytester):
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
