"""The `sovd-edge` command line: one subcommand per module, documented exit codes.
May import: every layer, dev tools included; it is where simulated ECUs are wired into the agent."""

from __future__ import annotations

import argparse
import errno
import io
import logging
import os
import signal
import sys
import traceback
from typing import NoReturn

from agent import __version__
from agent.cli import call, check_config, commands, demo, discover, doctor, import_odx, keygen, run, simulate, uds
from agent.cli.common import EXIT_CANTCREAT, EXIT_CODES, EXIT_SOFTWARE, GuardedOutput, Interrupted, OutputError, fail

log = logging.getLogger("agent.cli")
SUBCOMMANDS = (run, call, uds, commands, demo, simulate, check_config, doctor, discover, import_odx, keygen)


_EXIT_CODES = "exit codes (each subcommand's --help lists its own and what they mean there):\n" + "\n".join(
    f"  {code:<3} {meaning}" + (f" ({name})" if name else "") for code, (name, meaning) in EXIT_CODES.items()) + (
    "\nCtrl-C or SIGTERM: run and simulate stop cleanly (0); any other subcommand stops what it started,\n"
    "says so in one line and ends by that signal (a shell shows 130 or 143).")


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise Interrupted(signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovd-edge",
        description="SOVD edge agent: diagnostic commands from MQTT, run as UDS over ISO-TP on CAN.",
        epilog=_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sovd-edge {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # SIGPIPE stays ignored (Python's default): made fatal, a write to a socket whose peer is gone (the broker's
    # reset, a scrape that timed out) ended the daemon, which systemd counts as a clean exit and never restarts.
    # A closed stdout (`sovd-edge uds ... | head`) ends quietly below instead.
    args = build_parser().parse_args(argv)
    on_term = signal.signal(signal.SIGTERM, _interrupt)  # run and simulate put their stop request in its place
    if isinstance(sys.stdout, io.TextIOWrapper):  # an ASCII-only console (LANG=C): escape, as stderr does
        sys.stdout.reconfigure(errors="backslashreplace")
    stdout, sys.stdout = sys.stdout, GuardedOutput(sys.stdout) if sys.stdout is not None else None
    try:
        code = int(args.handler(args))
        if sys.stdout is not None:  # None when started with stdout closed (>&-): print() then writes nothing
            sys.stdout.flush()  # what is still buffered fails here, not as "Exception ignored" at exit
        return code
    except OutputError as err:
        if err.errno == errno.EPIPE:  # the reader (`| head`) has what it wanted: the end a pipeline expects
            _end_by_broken_pipe()
        fail(args, f"cannot write the output: {err.strerror}")
        return EXIT_CANTCREAT
    except KeyboardInterrupt:
        _end_by_signal(args, signal.SIGINT)
    except Interrupted as stop:
        _end_by_signal(args, stop.signum)
    except Exception as err:  # a bug: say so and exit 70, not Python's 1 (which means "did not complete")
        if hasattr(args, "log_format"):  # a subcommand that logs (run: JSON lines for journald)
            log.exception("internal error: %s: %s", type(err).__name__, err)
        else:
            traceback.print_exc()
            fail(args, f"internal error (a bug): {type(err).__name__}: {err}")
        return EXIT_SOFTWARE
    finally:
        sys.stdout = stdout
        signal.signal(signal.SIGTERM, on_term)  # as it was, for a caller that runs main() in its own process


def _end_by_broken_pipe() -> NoReturn:
    """Ends as a process whose stdout reader went away ends by default: by SIGPIPE, without a word."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    sys.exit(128 + signal.SIGPIPE)  # only if the signal is blocked


def _end_by_signal(args: argparse.Namespace, signum: int) -> NoReturn:
    """One line instead of a KeyboardInterrupt traceback, then the end a shell or systemd expects of a
    process stopped by `signum` (a shell script's loop stops on Ctrl-C; systemd counts SIGTERM as clean)."""
    name = signal.Signals(signum).name
    fail(args, f"interrupted by {name}" + (" (Ctrl-C)" if signum == signal.SIGINT else ""))
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    sys.exit(128 + signum)  # only if the signal is blocked


if __name__ == "__main__":
    sys.exit(main())
