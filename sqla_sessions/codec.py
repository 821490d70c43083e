"""Stored payload bytes: tagged JSON, optionally sealed with AES-GCM, bounded by `max_payload_bytes`.

Layout of a stored payload:

- plaintext: the UTF-8 JSON object itself (first byte `{`);
- encrypted: `0x01 | key id (4 bytes) | nonce (12 bytes) | AES-GCM ciphertext+tag`, with the
  session's stable key as associated data, so a row copied onto another session fails to open.

The key id is the first 4 bytes of SHA-256(key): the newest configured key seals, any configured
key opens, and rows sealed with an old key are resealed with the newest on their next write.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

from .config import SessionConfig, decode_encryption_key
from .errors import ConfigurationError, PayloadTooLarge
from .serializer import dumps_payload, loads_payload

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_SEALED = 0x01
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

    def dumps(self, raw: dict[str, Any], session_key: str) -> bytes:
        """Serialise (and seal) *raw*; raise `PayloadTooLarge` past the limit."""
        data = dumps_payload(raw)
        if self._sealer is not None:
            key_id, cipher = self._sealer
            nonce = os.urandom(_NONCE_BYTES)
            data = bytes((_SEALED,)) + key_id + nonce + cipher.encrypt(nonce, data, session_key.encode("ascii"))
        if len(data) > self._limit:
            raise PayloadTooLarge(len(data), self._limit)
        return data

    def loads(self, data: bytes, session_key: str) -> dict[str, Any]:
        """Open and parse stored bytes; raise `CorruptPayload` if that is impossible."""
        if not data:
            return {}
        if data[0] == _SEALED:
            data = self._open(data, session_key)
        elif self._sealer is not None:
            raise CorruptPayload("plaintext payload while encryption is configured")
        try:
            return loads_payload(data)
        except ValueError as exc:
            raise CorruptPayload(str(exc)) from None

    def _open(self, data: bytes, session_key: str) -> bytes:
        if len(data) < _HEADER_BYTES + 16:
            raise CorruptPayload("sealed payload is truncated")
        cipher = self._ciphers.get(data[1 : 1 + _KEY_ID_BYTES])
        if cipher is None:
            raise CorruptPayload("payload sealed with a key that is not configured")
        from cryptography.exceptions import InvalidTag

        nonce = data[1 + _KEY_ID_BYTES : _HEADER_BYTES]
        try:
            return cipher.decrypt(nonce, data[_HEADER_BYTES:], session_key.encode("ascii"))
        except InvalidTag:
            raise CorruptPayload("payload failed authentication (tampered, or bound to another session)") from None
