"""A save the server committed whose reply never arrived (the connection cut in between): the request
gets an error, as without batching, and the save is not written a second time (a compare-and-set
retried against its own write would merge the increment onto itself)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from sqla_sessions import DatabaseHandler, SessionConfig
from sqla_sessions.errors import StoreUnavailable
from tests.conftest import Backend, backend_for


class CuttingProxy:
    """A TCP proxy to PostgreSQL that, when armed, cuts the connection as the server's answer to an
    UPDATE (its CommandComplete) comes back: the server has run and committed it, the client never knows."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.armed = False
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_server and self.armed and b"C\x00" in data and b"UPDATE" in data:
                    self.armed = False
                    self.cuts += 1
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)  # wakes the other direction's recv (close alone would not)
                end.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def through_proxy(tmp_root: Path) -> Iterator[tuple[Backend, CuttingProxy, str]]:
    backend = backend_for("postgresql", tmp_root)
    url = make_url(backend.url)
    proxy = CuttingProxy(url.host or "127.0.0.1", url.port or 5432)
    yield backend, proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    proxy.close()


@pytest.mark.parametrize("sessions", [1, 2], ids=["batch of one", "many-row batch"])
def test_a_save_whose_reply_was_lost_fails_and_is_not_applied_twice(
    through_proxy: tuple[Backend, CuttingProxy, str], sessions: int, caplog: pytest.LogCaptureFixture
) -> None:
    backend, proxy, url = through_proxy
    handler = DatabaseHandler(url, SessionConfig())
    try:
        ids = []
        for _ in range(sessions):
            session = handler.load(None)
            session["n"] = 0
            session.save()
            ids.append(session.id)
        loaded = [handler.load(session_id) for session_id in ids]
        for session in loaded:
            session.increment("n")
        units = [handler.plan_save(session, end_of_request=True) for session in loaded]
        proxy.armed = True
        caplog.set_level(logging.CRITICAL)
        with handler.connect() as conn:
            outcomes = handler.write_many_on(conn, [unit for unit in units if unit is not None])
        assert proxy.cuts == 1
        for outcome in outcomes:  # each request of the statement gets the error (never None: not again)
            assert isinstance(outcome, Exception)
            assert "closed" in str(outcome) or "terminat" in str(outcome)
        direct = DatabaseHandler(backend.engine, SessionConfig())
        assert [direct.load(session_id)["n"] for session_id in ids] == [1] * sessions  # committed once
    finally:
        handler.close()


def test_through_the_handler_the_request_gets_store_unavailable(
    through_proxy: tuple[Backend, CuttingProxy, str], caplog: pytest.LogCaptureFixture
) -> None:
    backend, proxy, url = through_proxy
    handler = DatabaseHandler(url, SessionConfig())
    try:
        session = handler.load(None)
        session["n"] = 0
        session.save()
        again = handler.load(session.id)
        again.increment("n")
        proxy.armed = True
        caplog.set_level(logging.CRITICAL)
        with pytest.raises(StoreUnavailable):
            again.save()
        assert DatabaseHandler(backend.engine, SessionConfig()).load(session.id)["n"] == 1
    finally:
        handler.close()
