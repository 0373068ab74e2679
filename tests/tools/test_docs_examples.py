"""The tutorial's closing test, run as a user's suite runs it: the docs promise it passes.

The tutorial (docs/tutorial.md, section 7) ends with a test that cuts every connection through
a proxy and expects the next unit of work to succeed. It is copied here from the page itself, so
a change to the API or to the page that breaks it fails this test; the same test with a plain
engine and a plain commit must fail, or it would prove nothing.
"""

import re
from pathlib import Path

TUTORIAL = Path(__file__).parents[2] / "docs" / "tutorial.md"


def _tutorial_test() -> str:
    section = TUTORIAL.read_text().split("## 7. Prove it in your own tests", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, "docs/tutorial.md section 7 has no python block"
    return match.group(1)


def test_the_tutorials_test_passes(pytester):
    pytester.makepyfile(test_user=_tutorial_test())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_tutorials_test_fails_without_dropsafe(pytester):
    plain = _tutorial_test().replace("dropsafe.create_engine(", "sa.create_engine(")
    plain = plain.replace("dropsafe.run_transaction(", "_commit(")
    assert "dropsafe." not in plain  # nothing of dropsafe is left in the plain version
    plain += (
        "\n\ndef _commit(Session, fn):  # what the app did before the tutorial\n"
        "    with Session() as session:\n"
        "        result = fn(session)\n"
        "        session.commit()\n"
        "        return result\n"
    )
    pytester.makepyfile(test_user=plain)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*OperationalError*"])
