"""`llmdesk` entry point: one line per user error, a traceback only for bugs."""

from __future__ import annotations

import os
import sys

import typer

try:  # typer >= 0.29 carries its own copy of click; its exceptions are the ones raised
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from ..errors import LlmdeskError
from .app import app, err

# each module registers its commands on `app` when imported
from . import arena, ask, bench, convert, docs, doctor, evaluate, fit, judge, logs, mcp, models, prompt, quantize, run, serve, synth, train, tune  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    try:
        rc = app(args=argv, prog_name="llmdesk", standalone_mode=False)
        if isinstance(rc, int) and rc:
            # typer turns Ctrl-C into an exit code of 130 instead of raising it
            if rc == 130:
                err.print("interrupted", markup=False)
            return rc
    except LlmdeskError as e:
        err.print(f"error: {e}", markup=False)
        return e.exit_code
    except click_exc.UsageError as e:
        # one line instead of click's usage block
        cmd = e.ctx.command_path if e.ctx else "llmdesk"
        err.print(f"error: {e.format_message()} (see '{cmd} --help')", markup=False)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err.print("aborted", markup=False)
        return 130
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        return 130
    except BrokenPipeError:
        # output piped into `head` and friends: stop quietly (and keep Python's
        # own flush at exit from complaining about the closed pipe)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
