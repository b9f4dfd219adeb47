"""Signed commands (protocol v1.1): unwrap an envelope, check its key, signature, role and freshness.

The decisions are pure: `Authenticator.check` is given the decoded message and the time, and the
keys as verify functions. Only `load_authenticator` reads key files (through `policy.ed25519`,
which imports `cryptography`; an agent with no keys configured never calls it).

An envelope is `{"signed": base64(Command bytes), "key_id": ..., "sig": base64(Ed25519 signature)}`.
The signature covers the exact bytes: nothing is canonicalised, the inner Command is decoded from
exactly the bytes that were verified.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.model import SecurityConfig, SigningKey
from agent.errors import ConfigError
from agent.policy.mutating import is_mutating
from agent.wire import decode
from agent.wire.command import AuthFailure as Reason
from agent.wire.decode import Undecodable
from agent.wire.timefmt import format_rfc3339, parse_rfc3339

ENVELOPE_FIELDS = ("signed", "key_id", "sig")

Verify = Callable[[bytes, bytes], bool]  # (data, signature) -> valid
Body = dict[str, Any] | Undecodable


@dataclass(frozen=True)
class Envelope:
    signed: bytes
    key_id: str
    sig: bytes


@dataclass(frozen=True)
class Passed:
    """Go on with `body` (the inner Command of a verified envelope, or a plain one that needs no signature)."""

    body: Body
    key_id: str | None  # the key that signed it; None for a plain command


@dataclass(frozen=True)
class Refused:
    """Not authenticated: answer `rejected`/`unauthenticated` on the default topic, run nothing, remember nothing."""

    reason: Reason
    message: str
    command_id: str | None  # from the (unverified) body, to address the answer; None: cannot be answered
    body: dict[str, Any]  # the unverified Command, for component and command in the answer
    key_id: str | None = None
    rule: str | None = None  # the config rule that refused it (roles)

    def shown(self) -> dict[str, str]:
        """The unverified component and command, as they may be echoed in the answer and logged."""
        return {k: _safe(v) for k in ("component", "command") if isinstance(v := self.body.get(k), str)}

    def details(self) -> dict[str, str]:
        """The extra fields of the refusal's `error` object."""
        found = {"reason": str(self.reason), "key_id": self.key_id, "rule": self.rule}
        return {k: v for k, v in found.items() if v is not None}


def is_envelope(body: object) -> bool:
    """A message that tries to be an envelope (a Command has none of these fields)."""
    return isinstance(body, dict) and any(name in body for name in ENVELOPE_FIELDS)


def parse_envelope(body: dict[str, Any]) -> Envelope | str:
    """The envelope's parts, or what is wrong with its shape."""
    extra = sorted(str(k) for k in body if k not in ENVELOPE_FIELDS)
    if extra:
        return f"unknown envelope field {extra[0]!r}"
    missing = [name for name in ENVELOPE_FIELDS if not isinstance(body.get(name), str) or not body[name]]
    if missing:
        return f"envelope field {missing[0]!r} must be a non-empty string"
    try:
        signed = base64.b64decode(body["signed"], validate=True)
        sig = base64.b64decode(body["sig"], validate=True)
    except (binascii.Error, ValueError):
        return "envelope fields 'signed' and 'sig' must be base64"
    return Envelope(signed, body["key_id"], sig)


def envelope(command: bytes, key_id: str, signature: bytes) -> dict[str, str]:
    """The envelope for already-signed Command bytes (the backend side builds it so)."""
    return {"signed": base64.b64encode(command).decode("ascii"), "key_id": key_id,
            "sig": base64.b64encode(signature).decode("ascii")}


class Signer:
    """The backend side: wraps Command bytes in an envelope signed with a private key (`sovd-edge call --sign-key`)."""

    def __init__(self, key_id: str, sign: Callable[[bytes], bytes]) -> None:
        self.key_id = key_id
        self._sign = sign

    @classmethod
    def from_file(cls, path: Path, key_id: str) -> Signer:
        """Loads an Ed25519 private key (imports `cryptography`); KeyFileError or SigningUnavailableError."""
        from agent.policy import ed25519

        return cls(key_id, ed25519.load_private_key(path).sign)

    def wrap(self, command: bytes) -> bytes:
        """The envelope's payload for exactly these Command bytes."""
        return json.dumps(envelope(command, self.key_id, self._sign(command))).encode()


def needs_signature(mode: str, body: Body) -> bool:
    """Whether a plain (unsigned) message is refused under `security.require_signature: mode`.

    Input that does not decode (not JSON, not an object, oversize, non-finite numbers, lone surrogates)
    is not a command that lacks a signature but invalid input: it goes the usual way (invalid_command
    with the field, or an invalid_message event without an id), exactly as with signatures off.
    """
    if isinstance(body, Undecodable) or mode == "none":
        return False
    if mode == "all":
        return True
    return is_mutating(body.get("command"))  # `mutating`: only a read-only command goes without a signature


def _readable_id(body: Body) -> str | None:
    return body.command_id if isinstance(body, Undecodable) else decode.readable_id(body)


class Authenticator:
    """Decides, per message, whether it is authentic enough to be processed as a command."""

    def __init__(self, config: SecurityConfig, verifiers: Mapping[str, Verify]) -> None:
        self._config = config
        self._keys: dict[str, SigningKey] = {k.key_id: k for k in config.keys}
        self._verifiers = dict(verifiers)

    def check(self, body: Body, now: float, clock_trusted: bool = True) -> Passed | Refused:
        """The verdict on one decoded message received at `now` (epoch seconds).

        With `clock_trusted` False (the device clock is not known to be right) the freshness window
        is not judged here: the general `expires_at` rule refuses the command as `clock_unsynchronized`.
        """
        if not is_envelope(body):
            if needs_signature(self._config.require_signature, body):
                plain = body if isinstance(body, dict) else {}
                what = _name(plain["command"]) if isinstance(plain.get("command"), str) else "this command"
                return Refused(Reason.MISSING, f"{what} needs a signed envelope "
                               f"(security.require_signature: {self._config.require_signature})",
                               _readable_id(body), plain)
            return Passed(body, None)
        assert isinstance(body, dict)
        parsed = parse_envelope(body)
        if isinstance(parsed, str):  # answered by the inner id when it can be read
            inner = _salvage_inner(body.get("signed"))
            key_id = body.get("key_id") if isinstance(body.get("key_id"), str) else None
            return Refused(Reason.BAD_SIGNATURE, parsed, _readable_id(inner), _dict(inner), _short(key_id))
        inner = decode.decode_command(parsed.signed)
        command_id, shown = _readable_id(inner), _dict(inner)
        key = self._keys.get(parsed.key_id)
        verify = self._verifiers.get(parsed.key_id)
        if key is None or verify is None:
            return Refused(Reason.UNKNOWN_KEY, f"no key {_short(parsed.key_id)!r} is configured",
                           command_id, shown, _short(parsed.key_id))
        if not verify(parsed.signed, parsed.sig):
            return Refused(Reason.BAD_SIGNATURE, f"the signature does not match key {key.key_id!r}",
                           command_id, shown, key.key_id)
        if isinstance(inner, Undecodable):  # signed but not a command: the usual invalid-input answer
            return Passed(inner, key.key_id)
        refused = self._role(key, inner, command_id) or self._freshness(key, inner, command_id, now, clock_trusted)
        return refused or Passed(inner, key.key_id)

    def _role(self, key: SigningKey, body: dict[str, Any], command_id: str | None) -> Refused | None:
        command, component = body.get("command"), body.get("component")
        if key.commands is not None and not (isinstance(command, str) and command in key.commands):
            return Refused(Reason.NOT_ALLOWED, f"key {key.key_id!r} may not sign {_name(command)} "
                           f"(allowed: {', '.join(sorted(key.commands))})", command_id, body, key.key_id,
                           f"security.keys.{key.key_id}.commands")
        if key.components is not None and not (isinstance(component, str) and component in key.components):
            return Refused(Reason.NOT_ALLOWED, f"key {key.key_id!r} may not sign commands for {_name(component)} "
                           f"(allowed: {', '.join(sorted(key.components))})", command_id, body, key.key_id,
                           f"security.keys.{key.key_id}.components")
        return None

    def _freshness(self, key: SigningKey, body: dict[str, Any], command_id: str | None, now: float,
                   clock_trusted: bool) -> Refused | None:
        """A signed command carries `expires_at`, not yet past and at most max_expiry_ahead_s ahead."""
        raw = body.get("expires_at")
        if raw is None:
            return Refused(Reason.EXPIRED, "a signed command must carry expires_at", command_id, body, key.key_id)
        try:
            expires_at = parse_rfc3339(raw) if isinstance(raw, str) else None
        except ValueError:
            expires_at = None
        if expires_at is None or not clock_trusted:  # a malformed one is the usual invalid_command
            return None
        ahead = self._config.max_expiry_ahead_s
        if expires_at <= now:
            return Refused(Reason.EXPIRED, f"the signed command expired at {format_rfc3339(expires_at)}",
                           command_id, body, key.key_id)
        if expires_at > now + ahead:
            return Refused(Reason.EXPIRED, f"expires_at is more than {ahead} s ahead "
                           "(security.max_expiry_ahead_s)", command_id, body, key.key_id,
                           "security.max_expiry_ahead_s")
        return None


def load_authenticator(config: SecurityConfig, source: str = "config") -> Authenticator:
    """Reads every configured public key into an Authenticator; ConfigError (with each key's path) if it cannot."""
    from agent.policy import ed25519  # `cryptography` is imported on first use: only agents with keys pay for it

    verifiers: dict[str, Verify] = {}
    problems: list[tuple[str, str]] = []
    owners: dict[bytes, str] = {}  # each key under one id: the envelope's key_id is not signed
    for key in config.keys:
        where = f"security.keys.{key.key_id}.public_key"
        try:
            public = ed25519.load_public_key(key.public_key)
        except ed25519.SigningUnavailableError as err:
            raise ConfigError(source, [("security", str(err))]) from err
        except ed25519.KeyFileError as err:
            problems.append((where, str(err)))
            continue
        first = owners.setdefault(public.raw, key.key_id)
        if first != key.key_id:
            problems.append((where, f"the same public key as security.keys.{first}.public_key: an envelope's key_id "
                             "is not signed, so a command signed for either id would pass under the other's roles"))
            continue
        verifiers[key.key_id] = public.verify
    if problems:
        raise ConfigError(source, problems)
    return Authenticator(config, verifiers)


def _dict(body: Body) -> dict[str, Any]:
    return body if isinstance(body, dict) else {}


def _salvage_inner(signed: object) -> Body:
    """The inner Command of a malformed envelope, when its `signed` part still decodes."""
    if not isinstance(signed, str):
        return Undecodable("", "", None)
    try:
        return decode.decode_command(base64.b64decode(signed, validate=True))
    except (binascii.Error, ValueError):
        return Undecodable("", "", None)


def _short(text: str | None) -> str | None:
    """An unverified key id as it may be echoed and logged."""
    return None if text is None else _safe(text)


def _safe(text: str, limit: int = 64) -> str:
    """Unverified text bounded in length and encodable as UTF-8 (a lone surrogate is escaped)."""
    bounded = text if len(text) <= limit else text[:limit] + "…"
    return bounded.encode("utf-8", "backslashreplace").decode("utf-8")


def _name(value: object) -> str:
    return _safe(value) if isinstance(value, str) else _safe(repr(value))
