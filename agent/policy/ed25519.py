"""Ed25519 keys and signatures. The one module that touches `cryptography`, imported only when used.

`cryptography` (the Python Cryptographic Authority's library, OpenSSL underneath; Debian ships it as
python3-cryptography) is an optional extra: an agent without signed commands never loads it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent.errors import AgentError

SIGNATURE_BYTES = 64
MAX_KEY_FILE_BYTES = 16 * 1024  # a PEM Ed25519 key is about 120 bytes; room for comments
INSTALL_HINT = "pip install 'sovd-edge-agent[signing]' (Debian: apt install python3-cryptography)"


class SigningUnavailableError(AgentError, ImportError):
    """Signed commands are configured but the `cryptography` package is not installed."""


class KeyFileError(AgentError, ValueError):
    """A key file is missing, unreadable, or not an Ed25519 key of the expected kind."""


def _lib() -> SimpleNamespace:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as err:
        raise SigningUnavailableError(f"signed commands need the 'cryptography' package: {INSTALL_HINT}") from err
    return SimpleNamespace(InvalidSignature=InvalidSignature, serialization=serialization, ed25519=ed25519)


def _read(path: Path, what: str) -> tuple[bytes, int]:
    """The file's bytes and mode: a regular file of at most MAX_KEY_FILE_BYTES, holding one PEM block.

    Opened without blocking and checked before it is read: a FIFO or a device (/dev/zero) given as a key
    would stall start-up or be read until memory runs out.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise KeyFileError(f"cannot read {what} {path}: {err.strerror or err}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
            raise KeyFileError(f"{what} {path} is {kind}, not a regular file")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{what} {path} is too large for a key ({info.st_size} bytes)")
        data = b""
        while len(data) <= MAX_KEY_FILE_BYTES and (chunk := os.read(fd, MAX_KEY_FILE_BYTES + 1 - len(data))):
            data += chunk
    except OSError as err:
        raise KeyFileError(f"cannot read {what} {path}: {err.strerror or err}") from err
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{what} {path} is too large for a key (more than {MAX_KEY_FILE_BYTES} bytes)")
    blocks = data.count(b"-----BEGIN ")
    if blocks > 1:  # cryptography would read the first and ignore the rest without a word
        raise KeyFileError(f"{path} holds {blocks} PEM blocks: one key per file (for a rotation, give each key "
                           "its own entry under security.keys)")
    return data, info.st_mode


class PublicKey:
    """An Ed25519 public key that checks signatures."""

    def __init__(self, key: Any) -> None:
        self._key = key
        lib = _lib()
        self._invalid = lib.InvalidSignature
        self.raw = key.public_bytes(lib.serialization.Encoding.Raw, lib.serialization.PublicFormat.Raw)

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True when `signature` is this key's Ed25519 signature of exactly `data`."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            self._key.verify(signature, data)
        except self._invalid:
            return False
        return True


class PrivateKey:
    """An Ed25519 private key that signs (the backend side: `sovd-edge call --sign-key`)."""

    def __init__(self, key: Any) -> None:
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def load_public_key(path: Path) -> PublicKey:
    """A PEM public key file (SubjectPublicKeyInfo), as `sovd-edge keygen` or `openssl pkey -pubout` write."""
    lib = _lib()
    data, mode = _read(path, "public key")
    if mode & 0o022:  # the key decides which commands run: nobody but its owner may replace it
        raise KeyFileError(f"public key {path} is writable by {'others' if mode & 0o002 else 'its group'} "
                           f"(mode {mode & 0o777:o}); chmod 644 it")
    try:
        key = lib.serialization.load_pem_public_key(data)
    except ValueError as err:
        raise KeyFileError(f"{path} is not a PEM public key: {err}") from err
    if not isinstance(key, lib.ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return PublicKey(key)


def load_private_key(path: Path) -> PrivateKey:
    """An unencrypted PEM private key file (PKCS#8), as `sovd-edge keygen` or `openssl genpkey` write."""
    lib = _lib()
    data, mode = _read(path, "private key")
    if mode & 0o004:
        raise KeyFileError(f"private key {path} is world-readable (mode {mode & 0o777:o}); chmod 600 it")
    try:
        key = lib.serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, lib.ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return PrivateKey(key)


def generate(private_path: Path, public_path: Path) -> None:
    """Writes a new key pair: the private key with mode 0600 (created so, never widened), the public 0644."""
    lib = _lib()
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} exists; refusing to overwrite a key")
    key = lib.ed25519.Ed25519PrivateKey.generate()
    s = lib.serialization
    private_pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    public_pem = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except KeyFileError:
        private_path.unlink()  # half a pair is no use, and would block the next try ("exists")
        raise


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Creates `path` (never over an existing file) with `data`; on a failure nothing is left behind."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as err:
        raise KeyFileError(f"cannot create {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(path, mode)  # the umask may have narrowed the public key; the private one stays 0600
    except OSError as err:  # a full disk: the file we created is removed, not left half-written
        path.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write {path}: {err.strerror or err}") from err
