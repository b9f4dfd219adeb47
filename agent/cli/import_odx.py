"""`sovd-edge import-odx`: prints `ecus:` config entries from an ODX database (a PDX file)."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.cli.common import (
    ALWAYS,
    EXIT_CANTCREAT,
    EXIT_DATAERR,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_subcommand,
    fail,
)

EXITS = {
    **ALWAYS,
    EXIT_OK: "the ecus: entries are on stdout (or in the --output file)",
    EXIT_USAGE: "no such file, or no such ECU layer in it (the message lists them), or layers that answer on "
                "one CAN id (variants of one ECU: import one)",
    EXIT_DATAERR: "the file is not a readable PDX",
    EXIT_UNAVAILABLE: "odxtools is not installed (pip install 'sovd-edge-agent[odx]')",
    EXIT_CANTCREAT: "stdout, or the --output file, cannot be written (an existing file is left as it was)",
}


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "import-odx", "Print ecus: config entries (DIDs, routines, DTC texts, CAN ids) "
                       "from an ODX database. Needs the odx extra: pip install 'sovd-edge-agent[odx]'.",
                       "sovd-edge import-odx vehicle.pdx --ecu engine_variant_a > ecus.yaml", EXITS, handle)
    p.add_argument("pdx", type=Path, help="the PDX file (ODX in a zip)")
    p.add_argument("--ecu", action="append", metavar="NAME",
                   help="ODX layer to import (a base or ECU variant; repeatable); default: each base variant, "
                        "or its only ECU variant")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write the config to FILE instead of stdout: all of it or nothing (a failed import, or a "
                        "full disk, leaves an existing FILE as it was; a shell's > would have emptied it first)")


def handle(args: argparse.Namespace) -> int:
    try:
        import odxtools

        from agent.odx.importer import OdxImportError, SelectionError, import_pdx
    except ImportError:
        print("sovd-edge import-odx needs odxtools: pip install 'sovd-edge-agent[odx]' (on a workstation; "
              "the device only needs the config it prints)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    from agent.odx.entries import render

    if not args.pdx.is_file():
        what = "a directory, not a .pdx file" if args.pdx.is_dir() else "no such file"
        print(f"sovd-edge import-odx: {what}: {args.pdx}", file=sys.stderr)
        return EXIT_USAGE
    try:
        ecus = import_pdx(args.pdx, args.ecu)
    except OdxImportError as err:
        print(f"sovd-edge import-odx: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, SelectionError) else EXIT_DATAERR
    text = render(ecus, args.pdx.name, odxtools.__version__)
    if args.output is None:
        print(text, end="")
        return EXIT_OK
    try:
        write_whole(args.output, text.encode())
    except OSError as err:
        fail(args, f"cannot write {args.output}: {err.strerror or err}")
        return EXIT_CANTCREAT
    return EXIT_OK


def write_whole(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` in one step: written and synced beside it, then renamed over it.
    A symbolic link is followed, as a shell's > would: the file it points to is replaced, the link stays."""
    path = Path(os.path.realpath(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):  # never rename over a device, a directory or a FIFO
        raise OSError(0, "not a regular file")
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, stat.S_IMODE(mode) if mode is not None else 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)


def _umask() -> int:
    current = os.umask(0o022)  # read by setting it (single-threaded CLI): restored at once
    os.umask(current)
    return current
