"""The hot statements on PostgreSQL, prepared once per connection and run through psycopg's libpq binding.

With prepared statements off (`SessionConfig.prepared_statements`, psycopg's `prepare_threshold=None`)
they run as unnamed statements instead (`exec_params`): still binary, the SQL and encoders still built
once on the client, nothing left on a server connection a pooler may hand to another client.

psycopg's `cursor.execute` spends ~65 µs of CPU per statement here (cursor and adapter objects, query
conversion, a Python-level wait loop); `PGconn.exec_prepared` on the same connection spends ~20 µs
and waits for the server in C with the GIL released (benchmarks/session_cycle.py measures both). So
the four statements every request runs go this way when the connection allows it:

- the connection is psycopg 3's sync `Connection`, idle in autocommit (a failed statement then has
  no effect but the error), and its client encoding is UTF-8;
- parameters and results travel in binary, by the types each statement was prepared with (so no
  text escaping, and a NUL in a string is the server's error rather than a silent truncation);
- a connection or value this module does not take makes `execute` return None, and
  `handlers.fastpath` runs the statement on psycopg's cursor instead; an error from the server
  raises `StatementFailed`, and the statement is run once more through SQLAlchemy, which raises,
  maps and invalidates exactly as without this module (the cursor would only fail the same way).
  A prepared statement gone stale is prepared again on its next use.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.expression import Executable

try:
    from psycopg import Connection as PsycopgConnection
    from psycopg import pq
except ImportError:  # pragma: no cover - psycopg finds no libpq (neither the system's nor psycopg[binary]'s)
    PsycopgConnection = None  # type: ignore[assignment,misc]
    pq = None  # type: ignore[assignment]

#: `Connection.info` key: the names of the statements prepared on this DBAPI connection.
_PREPARED = "sqla_sessions_prepared"
#: Connection record `info` key: whether this module's statements go named (prepared) on the
#: connection; absent, psycopg's own setting decides (`prepare_threshold`). Set by `handlers.prepared`.
NAMED = "sqla_sessions_named"

#: SQLSTATEs of a prepared statement gone stale: deallocated (DISCARD ALL, a pooler), or its table
#: changed under it ("cached plan must not change result type", undefined table/column).
_STALE = (b"26000", b"0A000", b"42P01", b"42703")
_MISSING = b"26000"
_ALREADY_PREPARED = b"42P05"
#: How a server reports UTF-8; PgBouncer passes on the client's own spelling ("utf8", as we connect).
_UTF8 = (b"UTF8", b"utf8", b"UTF-8", b"utf-8")


class StatementFailed(Exception):
    """The server refused a statement sent through libpq (SQLAlchemy's path runs it again, and raises),
    or libpq lost the connection (no SQLSTATE then)."""

    def __init__(self, result: Any) -> None:
        super().__init__(result.error_message)
        sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
        self.sqlstate: bytes | None = sqlstate


class PreparedElsewhere(StatementFailed):
    """The statement prepared in the round trip before is missing on the server connection that got
    the execute: a pooler in transaction mode sent the two to different ones (`handlers.prepared`)."""


_INT8, _BYTEA, _TEXT, _VARCHAR, _INT4, _INT2, _NAME, _BPCHAR = 20, 17, 25, 1043, 23, 21, 19, 1042


def _decode_int(value: bytes) -> int:
    return int.from_bytes(value, "big", signed=True)


def _decode_text(value: bytes) -> str:
    return value.decode("utf-8")


#: Result columns in binary format, by type OID.
_DECODERS: dict[int, Callable[[bytes], Any]] = {
    _INT8: _decode_int,
    _INT4: _decode_int,
    _INT2: _decode_int,
    _TEXT: _decode_text,
    _VARCHAR: _decode_text,
    _BPCHAR: _decode_text,
    _NAME: _decode_text,
    _BYTEA: bytes,
}


def _encode_int8(value: Any) -> bytes | None:
    if type(value) is not int:
        return None
    return value.to_bytes(8, "big", signed=True)


def _encode_text(value: Any) -> bytes | None:
    return value.encode("utf-8") if type(value) is str else None


def _encode_bytea(value: Any) -> bytes | None:
    return value if type(value) is bytes else None


def _encode_array(element_oid: int, encode: Callable[[Any], bytes | None]) -> Callable[[Any], bytes | None]:
    """A binary-format encoder of a one-dimensional array whose elements *encode* takes (NULLs allowed)."""
    header = struct.Struct("!iiiii")
    length = struct.Struct("!i")
    null = length.pack(-1)

    def encode_array(values: Any) -> bytes | None:
        if type(values) is not list:
            return None
        parts = [header.pack(1, None in values, element_oid, len(values), 1)]
        for value in values:
            if value is None:
                parts.append(null)
                continue
            encoded = encode(value)
            if encoded is None:
                return None
            parts.append(length.pack(len(encoded)))
            parts.append(encoded)
        return b"".join(parts)

    return encode_array


#: Parameter types for statements written as SQL (`PreparedStatement(sql, parameters)`): OID and encoder.
INT8 = (_INT8, _encode_int8)
INT8_ARRAY = (1016, _encode_array(_INT8, _encode_int8))
VARCHAR_ARRAY = (1015, _encode_array(_VARCHAR, _encode_text))
BYTEA_ARRAY = (1001, _encode_array(_BYTEA, _encode_bytea))


def _parameter_type(bind_type: sa.types.TypeEngine[Any]) -> tuple[int, Callable[[Any], bytes | None]] | None:
    if isinstance(bind_type, sa.BigInteger):
        return _INT8, _encode_int8
    if isinstance(bind_type, sa.String):
        return _VARCHAR, _encode_text
    if isinstance(bind_type, sa.LargeBinary):
        return _BYTEA, _encode_bytea
    return None


class PreparedStatement:
    """One statement, prepared by name on each psycopg connection that runs it."""

    __slots__ = ("encoders", "formats", "name", "names", "sql", "types")

    def __init__(self, sql: str, parameters: list[tuple[str, tuple[int, Callable[[Any], bytes | None]]]]) -> None:
        """*sql* with $1, $2 … placeholders; *parameters*: each one's name and (type OID, binary encoder)."""
        self.sql: bytes = sql.encode()
        self.names: tuple[str, ...] = tuple(name for name, _ in parameters)
        self.types = tuple(oid for _, (oid, _) in parameters)
        self.encoders = tuple(encode for _, (_, encode) in parameters)
        self.formats = [1] * len(parameters)  # every parameter in binary
        # Same SQL, same name: handlers on one table share the prepared statement of a connection.
        self.name: bytes = b"sqla_sessions_" + hashlib.sha256(self.sql).hexdigest()[:24].encode()

    @staticmethod
    def compiled(statement: Executable) -> PreparedStatement:
        """The statement SQLAlchemy compiles for PostgreSQL; `TypeError` for a parameter type without
        a binary encoder here."""
        from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

        numbered = PGDialect_psycopg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]  # $1, $2 …
        compiled = statement.compile(dialect=numbered)  # type: ignore[attr-defined]
        parameters = []
        for name in compiled.positiontup:
            known = _parameter_type(compiled.binds[name].type)
            if known is None:
                raise TypeError(f"no binary encoding for parameter {name!r}")
            parameters.append((name, known))
        return PreparedStatement(str(compiled), parameters)

    @staticmethod
    def for_dialect(statement: Executable, dialect: sa.engine.Dialect) -> PreparedStatement | None:
        """A `PreparedStatement` for psycopg 3's sync PostgreSQL dialect, else None."""
        if pq is None or dialect.name != "postgresql" or dialect.driver != "psycopg" or dialect.is_async:
            return None
        try:
            return PreparedStatement.compiled(statement)
        except TypeError:
            return None

    def execute(self, dbapi_connection: Any, info: MutableMapping[str, Any], values: Mapping[str, Any]) -> Any:
        """Run on *dbapi_connection*; return the `PGresult`, None when this connection or these values
        are not for libpq, or raise `StatementFailed` when the server refused the statement.

        *info* is the SQLAlchemy connection record's `info` (it lives as long as the DBAPI connection).
        """
        if not _usable(dbapi_connection):
            return None
        pgconn = dbapi_connection.pgconn
        if pgconn.transaction_status != pq.TransactionStatus.IDLE:
            return None  # inside a transaction a failed statement would abort it: psycopg's cursor
        if pgconn.parameter_status(b"client_encoding") not in _UTF8:
            return None  # text goes out as UTF-8 bytes (`SET client_encoding` may change it at any time)
        params: list[bytes | None] = []
        for name, encode in zip(self.names, self.encoders, strict=True):
            value = values[name]
            if value is None:
                params.append(None)
                continue
            encoded = encode(value)
            if encoded is None:
                return None
            params.append(encoded)
        named = info.get(NAMED)
        if named is None:
            named = dbapi_connection.prepare_threshold is not None
        if not named:
            # Prepared statements are off (a pooler such as PgBouncer < 1.21 in transaction mode hands
            # each statement to any server connection): an unnamed statement, still binary both ways.
            result = pgconn.exec_params(self.sql, params, self.types, self.formats, 1)
            if result.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
                return result
            raise StatementFailed(result)
        prepared: set[bytes] = info.setdefault(_PREPARED, set())
        just_prepared = self.name not in prepared
        if just_prepared:
            result = pgconn.prepare(self.name, self.sql, self.types)
            if result.status != pq.ExecStatus.COMMAND_OK:
                if result.error_field(pq.DiagnosticField.SQLSTATE) == _ALREADY_PREPARED:
                    # A server session that has a statement this connection never prepared is shared
                    # with other clients: a pooler in transaction mode (handlers.prepared).
                    raise PreparedElsewhere(result)
                raise StatementFailed(result)
            prepared.add(self.name)
        result = pgconn.exec_prepared(self.name, params, self.formats, 1)
        if result.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            return result
        sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
        if sqlstate in _STALE:
            prepared.discard(self.name)  # prepare afresh next time
            pgconn.exec_(b"DEALLOCATE " + self.name)  # an error if it is gone already: harmless, idle
        if just_prepared and sqlstate == _MISSING:
            raise PreparedElsewhere(result)  # nothing on one server connection drops it between two round trips
        raise StatementFailed(result)


def _usable(dbapi_connection: Any) -> bool:
    """Checked at every call: autocommit and the threshold may change between checkouts."""
    return isinstance(dbapi_connection, PsycopgConnection) and dbapi_connection.autocommit


def connection_ok(dbapi_connection: Any) -> bool:
    """Whether libpq still holds a working connection (it marks one it lost as bad)."""
    pgconn = getattr(dbapi_connection, "pgconn", None)
    return pgconn is not None and pq is not None and pgconn.status == pq.ConnStatus.OK


def first_row(result: Any) -> tuple[Any, ...] | None:
    """The first row of a binary-format `PGresult`, decoded; None for no row.

    Raises `LookupError` for a column type this module does not decode.
    """
    return _row(result, 0, _decoders(result)) if result.ntuples else None


def all_rows(result: Any) -> list[tuple[Any, ...]]:
    """Every row of a binary-format `PGresult`, decoded."""
    decoders = _decoders(result)
    return [_row(result, number, decoders) for number in range(result.ntuples)]


def _decoders(result: Any) -> list[Callable[[bytes], Any]]:
    return [_DECODERS[result.ftype(column)] for column in range(result.nfields)]


def _row(result: Any, number: int, decoders: list[Callable[[bytes], Any]]) -> tuple[Any, ...]:
    values = (result.get_value(number, column) for column in range(len(decoders)))
    return tuple(None if value is None else decode(value) for value, decode in zip(values, decoders, strict=True))


def affected_rows(result: Any) -> int:
    """The rows an INSERT/UPDATE/DELETE matched."""
    return int(result.command_tuples or 0)
