"""The ``dropsafe`` command line: ``dropsafe reproduce`` shows the problem dropsafe solves.

Exit codes, the same for every command (docs/cli.md):

- 0: done; the command did what it was asked.
- 1: the command ran and found a problem: the database could not be examined (unreachable,
  authentication refused), the problem did not reproduce, a run failed.
- 2: bad usage or input: an unknown option, a malformed or unsupported URL, a value out of
  range, an ``--out`` that cannot be written, a missing optional extra.
- 130: interrupted (Ctrl-C).

Whatever it prints, and every log record, is masked with the passwords of the URLs on its
command line (`dropsafe._redaction.masked_output`).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import TYPE_CHECKING

from dropsafe import __version__
from dropsafe._cli._arguments import (
    EXIT_FOUND_PROBLEM,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandFailed,
    require_extra,
)
from dropsafe._errors import ConfigurationError, DropsafeError
from dropsafe._redaction import SecretMask, masked_output, redact_text

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "EXIT_FOUND_PROBLEM",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandFailed",
    "main",
    "require_extra",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    mask = SecretMask()
    for argument in arguments:
        if "://" in argument:
            mask.add_url(argument)
    with masked_output(mask):
        return _run(arguments, mask)


def _run(arguments: list[str], mask: SecretMask) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # argparse's own exit: 0 for --help, 2 for bad usage
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    args.secrets = mask  # a command that makes a secret (a server's URL) adds it here
    return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    """Run the command ``args`` name; its errors become an exit code and one masked line."""
    name = f"dropsafe {args.command}"
    try:
        return int(args.run(args))
    except ConfigurationError as exc:
        print(f"{name}: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except DropsafeError as exc:
        print(f"{name}: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_FOUND_PROBLEM
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - a bug or a broken machine: shown masked, not re-raised
        # Re-raised, the traceback would be printed after the output mask is gone.
        traceback.print_exc()
        print(f"{name}: failed (the traceback above says where)", file=sys.stderr)
        return EXIT_FOUND_PROBLEM


def _parser() -> argparse.ArgumentParser:
    from dropsafe._cli import (
        bench,
        demo,
        doctor,
        reproduce,
    )

    parser = argparse.ArgumentParser(
        prog="dropsafe",
        description="Keep SQLAlchemy applications working when PostgreSQL connections fail.",
        epilog="exit codes: 0 done, 1 a problem found, 2 bad usage or input, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"dropsafe {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command")
    demo.register(commands)
    doctor.register(commands)
    reproduce.register(commands)
    bench.register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
