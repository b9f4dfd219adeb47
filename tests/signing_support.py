"""Helpers for the signed-command suites: key pairs made at test time, envelopes, expiry times."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config.model import SecurityConfig, SigningKey
from agent.policy import ed25519
from agent.policy.signature import Signer
from agent.wire.timefmt import format_rfc3339


@dataclass(frozen=True)
class KeyPair:
    key_id: str
    private: Path
    public: Path

    def signer(self) -> Signer:
        return Signer.from_file(self.private, self.key_id)

    def sign(self, body: dict | bytes) -> bytes:
        """The envelope payload for `body` (a dict is serialised once; the bytes signed are the bytes sent)."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.signer().wrap(raw)

    def config(self, **limits) -> SigningKey:
        return SigningKey(self.key_id, self.public, **{k: frozenset(v) for k, v in limits.items()})


def make_keys(directory: Path, *key_ids: str) -> dict[str, KeyPair]:
    directory.mkdir(parents=True, exist_ok=True)
    pairs = {}
    for key_id in key_ids:
        pair = KeyPair(key_id, directory / f"{key_id}.key", directory / f"{key_id}.pub")
        ed25519.generate(pair.private, pair.public)
        pairs[key_id] = pair
    return pairs


def expires_in(seconds: float) -> str:
    return format_rfc3339(time.time() + seconds)


def security(*keys: SigningKey, mode: str = "mutating", **fields) -> SecurityConfig:
    return SecurityConfig(require_signature=mode, keys=keys, **fields)
