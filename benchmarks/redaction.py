r"""How long redaction takes on adversarial text: ``python benchmarks/redaction.py``.

`redact_text` runs on every event's error text and on everything ``dropsafe doctor`` prints, so
its time must not grow faster than its input. Each pattern is repeated to 20 KB, 80 KB and 1 MB
behind a URL (as a ``sslmode`` value would be); ``--regex`` also times the rule it replaced
(``://[^:\s]*:\S*(?=@)``, which backtracks over each word once per ``://`` in it), up to
``--regex-max`` bytes.

Measured on 2 shared cores, quiet, then loaded by other jobs (seconds):

| pattern | size | regex rule (before) | now |
|---|---:|---:|---:|
| ``://a:`` | 20 KB | 0.42 / 1.24 | 0.001 / 0.001 |
| ``://a:`` | 80 KB | 7.2 / 22.6 | 0.005 / 0.026 |
| ``://a:`` | 1 MB | ~1100 by the square law (not run) | 0.09 / 0.17 |
| ``://:`` | 80 KB | - / 30.2 | - / 0.012 |
| ``PASSWORD '`` (the new SQL rule) | 1 MB | - | - / 0.37 |
| ``pwd `` (the key=value rule, unchanged) | 1 MB | - | 0.34 / 0.62 |
"""

from __future__ import annotations

import argparse
import re
import time

from dropsafe._redaction import redact_text

PATTERNS = ("://a:", "://:", "password='", "PASSWORD '", "pwd ", "://a:@")
SIZES = (20_000, 80_000, 1_000_000)
_OLD_RULE = re.compile(r"(?P<head>://[^:\s]*:)\S*(?=@)")


def _timed(function: object, text: str) -> float:
    began = time.perf_counter()
    function(text)  # type: ignore[operator]
    return time.perf_counter() - began


def main() -> None:
    """Print one line per pattern and size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regex", action="store_true", help="also time the replaced regex")
    parser.add_argument("--regex-max", type=int, default=80_000, help="largest input for it")
    args = parser.parse_args()
    print(f"{'pattern':<12} {'bytes':>9} {'now s':>8} {'regex s':>8}")
    for pattern in PATTERNS:
        for size in SIZES:
            text = "postgresql://u@h/db?sslmode=" + pattern * (size // len(pattern))
            now = _timed(redact_text, text)
            old = "-"
            if args.regex and size <= args.regex_max:
                old = f"{_timed(lambda t: _OLD_RULE.sub('***', t), text):.3f}"
            print(f"{pattern!r:<12} {size:>9} {now:>8.3f} {old:>8}")


if __name__ == "__main__":
    main()
