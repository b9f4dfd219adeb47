"""`sovd-edge import-odx`: prints `ecus:` config entries from an ODX database (a PDX file)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.cli.common import ALWAYS, EXIT_DATAERR, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, add_subcommand

EXITS = {
    **ALWAYS,
    EXIT_OK: "the ecus: entries are on stdout",
    EXIT_USAGE: "no such file, or no such ECU layer in it (the message lists them), or layers that answer on "
                "one CAN id (variants of one ECU: import one)",
    EXIT_DATAERR: "the file is not a readable PDX",
    EXIT_UNAVAILABLE: "odxtools is not installed (pip install 'sovd-edge-agent[odx]')",
}


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "import-odx", "Print ecus: config entries (DIDs, routines, DTC texts, CAN ids) "
                       "from an ODX database. Needs the odx extra: pip install 'sovd-edge-agent[odx]'.",
                       "sovd-edge import-odx vehicle.pdx --ecu engine_variant_a > ecus.yaml", EXITS, handle)
    p.add_argument("pdx", type=Path, help="the PDX file (ODX in a zip)")
    p.add_argument("--ecu", action="append", metavar="NAME",
                   help="ODX layer to import (a base or ECU variant; repeatable); default: each base variant, "
                        "or its only ECU variant")


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
    print(render(ecus, args.pdx.name, odxtools.__version__), end="")
    return EXIT_OK
