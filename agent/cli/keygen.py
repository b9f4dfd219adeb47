"""`sovd-edge keygen`: an Ed25519 key pair for signed commands (development and tests)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.cli.common import EXIT_OK, EXIT_UNAVAILABLE, add_subcommand
from agent.config.parse import KEY_ID
from agent.config.reader import InvalidValueError

EXIT_USAGE = 2
EXIT_CANTCREAT = 73


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "keygen", "Make an Ed25519 key pair for signed commands: KEY_ID.key (private, mode 0600) "
                       "for the backend, KEY_ID.pub for the vehicle's security.keys. Never overwrites a file "
                       "(exit 73 if one exists or cannot be written; 69 without the cryptography package).",
                       "sovd-edge keygen --key-id backend-2026 --dir keys")
    p.add_argument("--key-id", required=True, help="the key's name in the vehicle's config (security.keys)")
    p.add_argument("--dir", type=Path, default=Path("."), help="where to write the two files (default: here)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from agent.policy.ed25519 import KeyFileError, SigningUnavailableError, generate  # only for this subcommand

    try:
        KEY_ID(args.key_id)
    except InvalidValueError as err:
        print(f"sovd-edge keygen: --key-id: {err}", file=sys.stderr)
        return EXIT_USAGE
    private, public = args.dir / f"{args.key_id}.key", args.dir / f"{args.key_id}.pub"
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
        generate(private, public)
    except SigningUnavailableError as err:
        print(f"sovd-edge keygen: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (KeyFileError, OSError) as err:
        print(f"sovd-edge keygen: {err}", file=sys.stderr)
        return EXIT_CANTCREAT
    print(f"private key: {private} (mode 0600; keep it on the backend, never on the vehicle)")
    print(f"public key:  {public}")
    print("vehicle config:")
    print(f"  security:\n    keys:\n      {args.key_id}: {{public_key: {public.resolve()}}}")
    print("sign with:")
    print(f"  sovd-edge call -c CONFIG --sign-key {private} --key-id {args.key_id} COMPONENT COMMAND ...")
    return EXIT_OK
