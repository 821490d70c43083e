"""Security promises, each with a test that could fail (see SECURITY.md)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, SessionInterrupted
from sqla_sessions.handlers.base import BaseHandler
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


def test_the_stored_id_hash_does_not_open_the_session(handler: BaseHandler[Any]) -> None:
    session = handler.load(None)
    session["secret"] = 1
    session.save()
    from sqla_sessions.ids import secret_hash

    # A leaked table row gives the key and the hash; presenting them (or a part of the hash) as a
    # cookie opens nothing.
    key, leaked = session.id.split(".")[0], secret_hash(session.id)
    assert key == session.key
    for forged in (leaked, leaked[:40], f"{key}.{leaked[:40]}", f"{key}.{leaked[24:]}", f"{key}.{leaked}"):
        assert handler.load(forged).is_new
