"""The ``dropsafe`` command line: ``dropsafe reproduce`` shows the problem dropsafe solves."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import TYPE_CHECKING

from dropsafe._errors import ConfigurationError, DropsafeError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main", "require_extra"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except DropsafeError as exc:
        print(f"dropsafe: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's own output
        return 1
    except KeyboardInterrupt:
        return 130


def require_extra(extra: str, *modules: str) -> None:
    """Raise `ConfigurationError` naming the pip command when a command's extra is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigurationError(
            f"this command needs the {extra!r} extra ({', '.join(missing)} missing): "
            f"pip install 'dropsafe[{extra}]'"
        )


def _parser() -> argparse.ArgumentParser:
    from dropsafe._cli import (  # noqa: PLC0415 - commands load what they need
        bench,
        demo,
        doctor,
        reproduce,
    )

    parser = argparse.ArgumentParser(
        prog="dropsafe",
        description="Keep SQLAlchemy applications working when PostgreSQL connections fail.",
    )
    commands = parser.add_subparsers(title="commands")
    demo.register(commands)
    doctor.register(commands)
    reproduce.register(commands)
    bench.register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
