"""How the CLI turns a failure into one clear line and an exit code.

The library raises typed exceptions, all under ``splitrelay.errors.SplitrelayError``;
the CLI never shows a traceback for them (``from_library``).  Exit codes are stable
so scripts can branch on them.
"""

from __future__ import annotations

import os
import sys

import click

from splitrelay.errors import SplitrelayError

EXIT_ERROR = 1          # the operation failed (one line says why)
EXIT_USAGE = 2          # click's own code for bad arguments
EXIT_PRIVILEGE = 3      # not root / missing capability
EXIT_DEPENDENCY = 4     # bcc or a system tool missing: run `make setup`
EXIT_UNREACHABLE = 5    # a daemon (edge agent, transceiver) did not answer


class CliError(click.ClickException):
    """One line for the user, with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"splitrelay: error: {self.format_message()}", err=True, file=file)


def exit_code(exc: SplitrelayError) -> int:
    """The exit code of a library error: the few that need their own, else EXIT_ERROR."""
    if getattr(exc, "status", None) == 0:   # ControlError: nothing answered at that URL
        return EXIT_UNREACHABLE
    return EXIT_ERROR


def from_library(exc: SplitrelayError) -> CliError:
    """One line and an exit code for any library error (a verifier rejection names its log)."""
    path = getattr(exc, "log_path", None)
    detail = f" (verifier log: {path})" if path and str(path) not in str(exc) else ""
    return CliError(str(exc) + detail, exit_code(exc))


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise CliError(f"{what} needs root (CAP_BPF/CAP_NET_ADMIN): run with sudo", EXIT_PRIVILEGE)


def require_bcc() -> None:
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise CliError(
            f"bcc is not importable from {sys.executable}: run `make setup` (installs python3-bpfcc "
            "and a venv with system site-packages)",
            EXIT_DEPENDENCY,
        ) from None
