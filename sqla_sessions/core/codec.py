"""Stored payload bytes: tagged JSON, optionally sealed with AES-GCM, bounded by `max_payload_bytes`.

Layout of a stored payload:

- plaintext: the UTF-8 JSON object itself (first byte `{`);
- encrypted: `0x02 | key id (4 bytes) | nonce (12 bytes) | AES-GCM ciphertext+tag`, with the row's
  key, user id and version as associated data: a payload copied onto another session, a user id
  changed in the table, or an older ciphertext of the same row put back beside a newer version all
  fail to open. (`0x01`, written before, bound the key alone; it is read, and resealed as `0x02`.)

The key id is the first 4 bytes of SHA-256(key): the newest configured key seals, any configured
key opens, and a row sealed with an older key (or the older layout) is resealed with the newest at
its next write or touch, so rotating keys out logs nobody out who was active since.

Nonce budget: nonces are 96 random bits, so one key should seal at most 2^32 payloads (NIST SP
800-38D); at a thousand writes a second that is four months. Rotate keys well within that.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

from ..config import SessionConfig, decode_encryption_key
from ..errors import ConfigurationError, PayloadTooLarge
from .serializer import dumps_payload, loads_payload

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_SEALED_V1 = 0x01  # associated data: the row key
_SEALED = 0x02  # associated data: the row key, user id and version
_KEY_ID_BYTES = 4
_NONCE_BYTES = 12
_HEADER_BYTES = 1 + _KEY_ID_BYTES + _NONCE_BYTES


class CorruptPayload(ValueError):
    """A stored payload that cannot be decrypted or parsed."""


class PayloadCodec:
    """Turn raw payload dicts into stored bytes and back, for one configuration."""

    __slots__ = ("_ciphers", "_limit", "_sealer")

    def __init__(self, config: SessionConfig) -> None:
        self._limit = config.max_payload_bytes
        self._ciphers: dict[bytes, AESGCM] = {}
        self._sealer: tuple[bytes, AESGCM] | None = None
        if config.encryption_keys:
            try:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            except ImportError:  # pragma: no cover - depends on the installed extras
                raise ConfigurationError(
                    "encryption_keys",
                    "encryption needs the 'cryptography' package: pip install 'sqla-sessions[encryption]'",
                ) from None
            for configured in config.encryption_keys:
                raw_key = decode_encryption_key(configured)
                key_id = hashlib.sha256(raw_key).digest()[:_KEY_ID_BYTES]
                cipher = AESGCM(raw_key)
                self._ciphers.setdefault(key_id, cipher)
                if self._sealer is None:
                    self._sealer = (key_id, cipher)

    @property
    def encrypted(self) -> bool:
        return self._sealer is not None

    def dumps(self, raw: dict[str, Any], session_key: str, user_id: str | None = None, version: int = 0) -> bytes:
        """Serialise (and seal, bound to the row's key, user id and version) *raw*; raise
        `PayloadTooLarge` past the limit."""
        data = dumps_payload(raw)
        if self._sealer is not None:
            key_id, cipher = self._sealer
            nonce = os.urandom(_NONCE_BYTES)
            bound = _associated_data(session_key, user_id, version)
            data = bytes((_SEALED,)) + key_id + nonce + cipher.encrypt(nonce, data, bound)
        if len(data) > self._limit:
            raise PayloadTooLarge(len(data), self._limit)
        return data

    def loads(self, data: bytes, session_key: str, user_id: str | None = None, version: int = 0) -> dict[str, Any]:
        """Open and parse stored bytes of the row (*session_key*, *user_id*, *version*); raise
        `CorruptPayload` if that is impossible."""
        if not data:
            if self._sealer is not None:  # a writer of the table emptied it: no session to trust
                raise CorruptPayload("empty payload while encryption is configured")
            return {}
        if data[0] == _SEALED:
            data = self._open(data, _associated_data(session_key, user_id, version))
        elif data[0] == _SEALED_V1:
            data = self._open(data, session_key.encode("ascii"))
        elif self._sealer is not None:
            raise CorruptPayload("plaintext payload while encryption is configured")
        try:
            return loads_payload(data)
        except ValueError as exc:
            raise CorruptPayload(str(exc)) from None

    def needs_reseal(self, data: bytes) -> bool:
        """Whether a stored payload should be sealed again: by an older key, or in the older layout."""
        if self._sealer is None or not data:
            return False
        return data[0] != _SEALED or data[1 : 1 + _KEY_ID_BYTES] != self._sealer[0]

    def _open(self, data: bytes, associated: bytes) -> bytes:
        if len(data) < _HEADER_BYTES + 16:
            raise CorruptPayload("sealed payload is truncated")
        cipher = self._ciphers.get(data[1 : 1 + _KEY_ID_BYTES])
        if cipher is None:
            raise CorruptPayload("payload sealed with a key that is not configured")
        from cryptography.exceptions import InvalidTag

        nonce = data[1 + _KEY_ID_BYTES : _HEADER_BYTES]
        try:
            return cipher.decrypt(nonce, data[_HEADER_BYTES:], associated)
        except InvalidTag:
            raise CorruptPayload(
                "payload failed authentication (tampered, or bound to another session, user or version)"
            ) from None


def _associated_data(session_key: str, user_id: str | None, version: int) -> bytes:
    # NUL separates the parts: neither a key (hex) nor a user id (validated at login) contains one.
    return f"sqla_sessions/2\0{session_key}\0{user_id or ''}\0{version}".encode()
