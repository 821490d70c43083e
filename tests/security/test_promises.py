"""Security promises, each with a test that could fail (see SECURITY.md)."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import pytest
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, SessionInterrupted
from sqla_sessions.store.handlers.base import BaseHandler
from tests.conftest import HandlerFactory

KEY_A = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"


def test_session_ids_never_reach_the_logs_or_the_database_layer(
    make_handler: HandlerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    handler = make_handler()
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):  # every logger, SQLAlchemy's statement log included
        logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
        try:
            session = handler.load(None)
            session["a"] = 1
            session.save()
            seen.append(session.id)
            again = handler.load(session.id)
            again.login("u")
            again.save()
            seen.append(again.id)
            handler.load(seen[0])  # the old, regenerated id: unknown now (logged)
            handler.load(seen[0][:-1] + "!")  # malformed (logged)
            late = handler.load(again.id)
            handler.revoke(late.key or "")
            late["b"] = 2
            with pytest.raises(SessionInterrupted):
                late.save()
        finally:
            logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    assert "unknown or expired" in caplog.text and "malformed" in caplog.text
    for session_id in seen:
        secret = session_id.split(".")[1]  # the key may be logged: it names a row and opens nothing
        assert secret not in caplog.text
        assert secret[:12] not in caplog.text


def test_a_row_copied_onto_another_sessions_key_fails_to_decrypt(
    make_handler: HandlerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    handler = make_handler(encryption_keys=(KEY_A,))
    if not isinstance(handler, DatabaseHandler):
        pytest.skip("copies rows in SQL")
    victim, attacker = handler.load(None), handler.load(None)
    victim["role"] = "admin"
    victim.save()
    attacker["role"] = "guest"
    attacker.save()
    table = handler.table
    with handler.engine.begin() as conn:
        stolen = conn.execute(sa.select(table.c.payload).where(table.c.key == victim.key)).scalar_one()
        conn.execute(sa.update(table).where(table.c.key == attacker.key).values(payload=stolen))
    with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
        loaded = handler.load(attacker.id)
    assert loaded.is_new and "role" not in loaded  # bound to the victim's key: it does not open here
    assert "failed authentication" in caplog.text


def test_a_tampered_ciphertext_is_refused(make_handler: HandlerFactory) -> None:
    handler = make_handler(encryption_keys=(KEY_A,))
    if not isinstance(handler, DatabaseHandler):
        pytest.skip("edits rows in SQL")
    session = handler.load(None)
    session["x"] = 1
    session.save()
    table = handler.table
    with handler.engine.begin() as conn:
        payload = bytearray(conn.execute(sa.select(table.c.payload)).scalar_one())
        payload[-1] ^= 1
        conn.execute(sa.update(table).values(payload=bytes(payload)))
    assert handler.load(session.id).is_new


KEY_B = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA"


def _sealed_row(make_handler: HandlerFactory) -> tuple[DatabaseHandler, Any, sa.Table]:
    handler = make_handler(encryption_keys=(KEY_A,))
    if not isinstance(handler, DatabaseHandler):
        pytest.skip("edits rows in SQL")
    session = handler.load(None)
    session.login("alice")
    session["role"] = "admin"
    session.save()
    return handler, session, handler.table


def test_a_user_id_changed_in_the_table_does_not_carry_the_sealed_payload(make_handler: HandlerFactory) -> None:
    handler, session, table = _sealed_row(make_handler)
    with handler.engine.begin() as conn:  # a writer of the table moves alice's session to mallory
        conn.execute(sa.update(table).where(table.c.key == session.key).values(user_id="mallory"))
    loaded = handler.load(session.id)
    assert loaded.is_new and "role" not in loaded and loaded.user_id is None


def test_an_older_ciphertext_put_back_beside_a_newer_version_does_not_open(make_handler: HandlerFactory) -> None:
    handler, session, table = _sealed_row(make_handler)
    with handler.engine.connect() as conn:
        older = conn.execute(sa.select(table.c.payload).where(table.c.key == session.key)).scalar_one()
    session["role"] = "guest"  # demoted: version + 1
    session.save()
    with handler.engine.begin() as conn:  # the old "admin" ciphertext restored over the new one
        conn.execute(sa.update(table).where(table.c.key == session.key).values(payload=older))
    assert handler.load(session.id).is_new


def test_an_emptied_payload_is_refused_when_encryption_is_on(make_handler: HandlerFactory) -> None:
    handler, session, table = _sealed_row(make_handler)
    with handler.engine.begin() as conn:
        conn.execute(sa.update(table).where(table.c.key == session.key).values(payload=b""))
    loaded = handler.load(session.id)
    assert loaded.is_new and loaded.user_id is None


def test_a_touch_reseals_with_the_newest_key_so_rotating_the_old_one_out_logs_nobody_out(
    make_handler: HandlerFactory, clock: Any
) -> None:
    old = make_handler(encryption_keys=(KEY_A,))
    session = old.load(None)
    session["n"] = 1
    session.save()
    rotated = make_handler(encryption_keys=(KEY_B, KEY_A))
    clock.advance(rotated.config.touch_interval + 1)
    assert rotated.load(session.id).save().value == "touched"  # only read, but the touch reseals
    only_new = make_handler(encryption_keys=(KEY_B,))
    assert only_new.load(session.id)["n"] == 1


def test_payloads_sealed_in_the_older_layout_still_open_and_are_resealed(
    make_handler: HandlerFactory, clock: Any
) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from sqla_sessions.config import decode_encryption_key
    from sqla_sessions.core.serializer import dumps_payload

    handler, session, table = _sealed_row(make_handler)
    raw_key = decode_encryption_key(KEY_A)
    nonce = os.urandom(12)  # 0.1's layout: 0x01, the row key alone as associated data
    legacy = (
        b"\x01"
        + hashlib.sha256(raw_key).digest()[:4]
        + nonce
        + AESGCM(raw_key).encrypt(nonce, dumps_payload({"role": "legacy"}), (session.key or "").encode())
    )
    with handler.engine.begin() as conn:
        conn.execute(sa.update(table).where(table.c.key == session.key).values(payload=legacy))
    assert handler.load(session.id)["role"] == "legacy"
    clock.advance(handler.config.touch_interval + 1)
    handler.load(session.id).save()
    with handler.engine.connect() as conn:
        stored = bytes(conn.execute(sa.select(table.c.payload).where(table.c.key == session.key)).scalar_one())
    assert stored[0] == 0x02 and handler.load(session.id)["role"] == "legacy"


def test_the_stored_id_hash_does_not_open_the_session(handler: BaseHandler[Any]) -> None:
    session = handler.load(None)
    session["secret"] = 1
    session.save()
    from sqla_sessions.core.ids import secret_hash

    # A leaked table row gives the key and the hash; presenting them (or a part of the hash) as a
    # cookie opens nothing.
    key, leaked = session.id.split(".")[0], secret_hash(session.id)
    assert key == session.key
    for forged in (leaked, leaked[:40], f"{key}.{leaked[:40]}", f"{key}.{leaked[24:]}", f"{key}.{leaked}"):
        assert handler.load(forged).is_new
