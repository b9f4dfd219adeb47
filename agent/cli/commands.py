"""`sovd-edge commands`: each command with its params and one example, from the catalog in agent/wire;
also renders the README's and docs/protocol.md's tables, so that they never drift from the code."""

from __future__ import annotations

import argparse
import re
import textwrap
from typing import Any

from agent.cli.common import ALWAYS, EXIT_CODES, EXIT_OK, EXIT_USAGE, add_subcommand, fail
from agent.wire.catalog import CATALOG, SESSIONS_NOTE, CommandSpec

EXITS = {**ALWAYS, EXIT_OK: "the list was printed", EXIT_USAGE: "unknown arguments, or no command of that name"}
EXAMPLE_CONFIG = "config/demo.yaml"
WORDS = ("params are key=value words, read as each command takes them: hex, names and ids as typed "
         "(request=3E80, data=0xF190), a,b for several DIDs, true/false for flags; key:=JSON gives a "
         "JSON value as is; or pass one JSON object")


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "commands", "List the diagnostic commands with their params and an example.",
                       "sovd-edge commands operation", EXITS, handle)
    p.add_argument("command", nargs="?", help="one command to show")
    p.add_argument("--markdown", choices=("readme", "protocol", "exit-codes"), help=argparse.SUPPRESS)


def handle(args: argparse.Namespace) -> int:
    if args.markdown:
        print(_MARKDOWN[args.markdown]())
        return EXIT_OK
    if args.command is not None and args.command not in CATALOG:
        fail(args, f"no command named {args.command!r} (known: {', '.join(CATALOG)})")
        return EXIT_USAGE
    specs = [CATALOG[args.command]] if args.command else list(CATALOG.values())
    print("\n\n".join(_detail(spec) for spec in specs))
    if any(spec.needs for spec in specs):
        print("\n" + textwrap.fill(_plain(SESSIONS_NOTE), 100))
    if not args.command:
        print("\n" + textwrap.fill(WORDS + ".", 100))
    return EXIT_OK


def summary() -> str:
    """One line per command: its params ([optional]) and an example; for `uds --help` and `call --help`."""
    lines = [f"  {s.name:<16} {' '.join(p.shown for p in s.params) or '-':<36} e.g. {s.example}"
             for s in CATALOG.values()]
    return ("commands (params in [] are optional; `sovd-edge commands NAME` explains one):\n"
            + "\n".join(lines) + "\n" + textwrap.fill(WORDS + ".", 100))


def _plain(markdown: str) -> str:
    return re.sub(r"`([^`]*)`", r"\1", markdown)


def _detail(spec: CommandSpec) -> str:
    service = "any UDS service" if spec.service == "any" else f"UDS {spec.service}"
    lines = [f"{spec.name} ({service})"]
    lines += [f"  {p.name:<12} {'' if p.required else '(optional) '}{_plain(p.doc)}" for p in spec.params]
    lines.append(f"  result: {_plain(spec.result)}")
    lines.append(f"  example: sovd-edge uds -c {EXAMPLE_CONFIG} {spec.example}")
    if spec.needs:
        lines.append(f"  needs: {_plain(spec.needs)} (see below)")
    return "\n".join(lines)


def readme_table() -> str:
    rows = ["| command | params ([optional]) | example (`sovd-edge uds -c config/demo.yaml ...`) |",
            "|---|---|---|"]
    for s in CATALOG.values():
        params = "; ".join(f"`{p.shown}`: {p.doc}" for p in s.params) or "none"
        needs = f" (needs {s.needs})" if s.needs else ""
        rows.append(f"| `{s.name}` | {params} | `{s.example}`{needs} |")
    return "\n".join(rows) + "\n\n" + SESSIONS_NOTE


def protocol_table() -> str:
    rows = ["| command | params | UDS | result |", "|---|---|---|---|"]
    for s in CATALOG.values():
        params = "; ".join(f"`{p.name}`{'' if p.required else ' (optional)'}: {p.doc}" for p in s.params) or "—"
        rows.append(f"| `{s.name}` | {params} | {s.service} | {s.result} |")
    return "\n".join(rows)


def exit_codes_table() -> str:
    from agent.cli import SUBCOMMANDS  # the subcommands import this module: import them only when asked

    rows = ["| code | sysexits | meaning | returned by |", "|---|---|---|---|"]
    for code, (name, meaning) in EXIT_CODES.items():
        by_note: dict[str, list[str]] = {}
        for module in SUBCOMMANDS:
            if code in module.EXITS:
                by_note.setdefault(module.EXITS[code], []).append(module.__name__.rsplit(".", 1)[-1].replace("_", "-"))
        shown = "; ".join(f"{', '.join(f'`{s}`' for s in subs)}: {note}" for note, subs in by_note.items())
        rows.append(f"| `{code}` | {name or '—'} | {meaning} | {shown} |")
    return "\n".join(rows)


_MARKDOWN = {"readme": readme_table, "protocol": protocol_table, "exit-codes": exit_codes_table}
