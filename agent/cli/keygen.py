"""`sovd-edge keygen`: an Ed25519 key pair for signed commands (development and tests)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.common import ALWAYS, EXIT_CANTCREAT, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, add_subcommand, fail
from agent.config.parse import KEY_ID
from agent.config.reader import InvalidValueError

EXITS = {
    **ALWAYS,
    EXIT_OK: "the key pair was written",
    EXIT_USAGE: "unknown or missing arguments, or a --key-id that is not a valid key id",
    EXIT_UNAVAILABLE: "the cryptography package is not installed (pip install 'sovd-edge-agent[signing]')",
    EXIT_CANTCREAT: "a key file exists already (never overwritten) or cannot be written, or stdout cannot be written",
}


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "keygen", "Make an Ed25519 key pair for signed commands: KEY_ID.key (private, mode 0600) "
                       "for the backend, KEY_ID.pub for the vehicle's security.keys. Never overwrites a file "
                       "(exit 73 if one exists or cannot be written; 69 without the cryptography package).",
                       "sovd-edge keygen --key-id backend-2026 --dir keys", EXITS, handle)
    p.add_argument("--key-id", required=True, help="the key's name in the vehicle's config (security.keys)")
    p.add_argument("--dir", type=Path, default=Path("."), help="where to write the two files (default: here)")


def handle(args: argparse.Namespace) -> int:
    from agent.policy.ed25519 import KeyFileError, SigningUnavailableError, generate  # only for this subcommand

    try:
        KEY_ID(args.key_id)
    except InvalidValueError as err:
        fail(args, f"--key-id: {err}")
        return EXIT_USAGE
    private, public = args.dir / f"{args.key_id}.key", args.dir / f"{args.key_id}.pub"
    if args.dir.exists() and not args.dir.is_dir():
        fail(args, f"--dir {args.dir} is a file, not a directory: give the directory to write the keys into")
        return EXIT_CANTCREAT
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
        generate(private, public)
    except SigningUnavailableError as err:
        fail(args, str(err))
        return EXIT_UNAVAILABLE
    except (KeyFileError, OSError) as err:
        fail(args, str(err))
        return EXIT_CANTCREAT
    print(f"private key: {private} (mode 0600; keep it on the backend, never on the vehicle)")
    print(f"public key:  {public}")
    print("vehicle config:")
    print(f"  security:\n    keys:\n      {args.key_id}: {{public_key: {public.resolve()}}}")
    print("sign with:")
    print(f"  sovd-edge call -c CONFIG --sign-key {private} --key-id {args.key_id} COMPONENT COMMAND ...")
    return EXIT_OK
