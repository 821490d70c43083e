"""Alembic: upgrade, no autogenerate drift, downgrade, upgrade again; offline SQL; the wheel ships it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from sqla_sessions import downgrade, upgrade
from sqla_sessions.store.migrate import DEFAULT_VERSION_TABLE, alembic_config, version_table_for
from tests.conftest import Backend

ROOT = Path(__file__).resolve().parent.parent


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_check_downgrade_upgrade(db_backend: Backend) -> None:
    engine = db_backend.engine
    table = f"mig_{uuid.uuid4().hex[:8]}"
    upgrade(engine, table=table)
    assert {table, version_table_for(table)} <= _tables(engine)
    # No difference between the migrated schema and the library's MetaData (raises if there is one).
    command.check(alembic_config(engine, table=table))
    inspector = sa.inspect(engine)
    index_columns = {tuple(ix["column_names"]) for ix in inspector.get_indexes(table)}
    assert {("user_id", "last_activity"), ("expires_at",)} <= index_columns
    # The key (what a cookie names) is the primary key; the secret's hash needs no index of its own.
    assert not [u for u in inspector.get_unique_constraints(table) if u["column_names"] == ["id_hash"]]
    migrated = sa.Table(table, sa.MetaData(), autoload_with=engine)
    row = {
        "key": "a" * 32,
        "id_hash": "f" * 64,
        "payload": b"{}",
        "version": 1,
        "created_at": 0,
        "last_activity": 0,
        "expires_at": 0,
    }
    with engine.begin() as conn:
        conn.execute(migrated.insert(), row)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(migrated.insert(), {**row, "id_hash": "e" * 64})

    downgrade(engine, table=table)
    assert table not in _tables(engine)
    upgrade(engine, table=table)
    assert table in _tables(engine)
    command.check(alembic_config(engine, table=table))
    downgrade(engine, table=table)


def test_split_tokens_drop_the_sessions_old_cookies_reach_and_the_id_hash_index(db_backend: Backend) -> None:
    engine = db_backend.engine
    table = f"mig_{uuid.uuid4().hex[:8]}"
    upgrade(engine, table=table, revision="sqla_sessions_0002")
    old = sa.Table(table, sa.MetaData(), autoload_with=engine)
    row = {"id_hash": "f" * 64, "payload": b"{}", "version": 1, "created_at": 0, "last_activity": 0, "expires_at": 9}
    with engine.begin() as conn:
        conn.execute(old.insert(), {**row, "key": "a" * 32})
    upgrade(engine, table=table)
    with engine.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(old)).scalar_one() == 0
        conn.execute(old.insert(), [{**row, "key": "a" * 32}, {**row, "key": "b" * 32}])  # one hash, two rows
    downgrade(engine, table=table, revision="sqla_sessions_0002")
    with engine.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(old)).scalar_one() == 0
        conn.execute(old.insert(), {**row, "key": "a" * 32})
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(old.insert(), {**row, "key": "b" * 32})  # 0.1's lookup needs the hash unique again
    downgrade(engine, table=table)


def test_a_second_table_name_gets_its_own_version_table(db_backend: Backend) -> None:
    engine = db_backend.engine
    first, second = f"a_{uuid.uuid4().hex[:8]}", f"b_{uuid.uuid4().hex[:8]}"
    upgrade(engine, table=first)
    upgrade(engine, table=second)  # would be a no-op if both shared one version table
    assert {first, second} <= _tables(engine)
    downgrade(engine, table=first)
    downgrade(engine, table=second)


def test_the_host_apps_alembic_version_is_untouched(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'host.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('host_rev_1')")
    upgrade(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == ["host_rev_1"]
        assert conn.exec_driver_sql(f"SELECT version_num FROM {DEFAULT_VERSION_TABLE}").scalar_one() == (
            "sqla_sessions_0005"
        )
    engine.dispose()


def _alembic(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_alembic_cli_from_the_repository_root(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    result = _alembic("upgrade", "head", env={"SQLA_SESSIONS_DATABASE_URL": f"sqlite:///{db}"})
    assert result.returncode == 0, result.stderr
    assert "sessions" in _tables(sa.create_engine(f"sqlite:///{db}"))

    other = tmp_path / "x.db"
    result = _alembic("-x", f"url=sqlite:///{other}", "-x", "table=web_sessions", "upgrade", "head", env={})
    assert result.returncode == 0, result.stderr
    assert {"web_sessions", version_table_for("web_sessions")} <= _tables(sa.create_engine(f"sqlite:///{other}"))


@pytest.mark.parametrize(
    ("url", "marker"),
    [
        ("postgresql+psycopg://u@h/db", "BYTEA"),
        ("mysql+pymysql://u@h/db", "LONGBLOB"),
        ("sqlite:///x.db", "BLOB"),
    ],
)
def test_upgrade_head_sql_prints_the_ddl(url: str, marker: str) -> None:
    result = _alembic("upgrade", "head", "--sql", env={"SQLA_SESSIONS_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    ddl = result.stdout
    assert f"CREATE TABLE {DEFAULT_VERSION_TABLE}" in ddl
    assert "CREATE TABLE sessions" in ddl and marker in ddl
    assert "CREATE INDEX ix_sessions_user_id_last_activity" in ddl
    assert "CREATE INDEX ix_sessions_expires_at" in ddl


def test_a_url_with_percent_signs_is_passed_through(tmp_path: Path) -> None:
    # ConfigParser interpolation would choke on a '%' if the URL went through alembic's main options.
    folder = tmp_path / "with%percent"
    folder.mkdir()
    # SQLAlchemy writes the URL: '%25' where it decodes the database part (2.1), a bare '%' where it does not (2.0).
    upgrade(sa.URL.create("sqlite", database=str(folder / "s.db")).render_as_string())
    assert (folder / "s.db").exists()


@pytest.mark.slow
def test_the_wheel_ships_the_migrations_and_migrates_from_an_install(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sqla_sessions/migrations/env.py" in names
    assert "sqla_sessions/migrations/versions/sqla_sessions_0001_create_sessions.py" in names
    assert "sqla_sessions/migrations/versions/sqla_sessions_0002_leases.py" in names
    assert "sqla_sessions/py.typed" in names

    # Install the wheel alone into a folder and migrate from there, away from the checkout.
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    db = tmp_path / "from_wheel.db"
    code = (
        "import sqla_sessions, sqla_sessions.store.migrate as m;"
        f"assert m.script_location().startswith({str(target)!r}), m.script_location();"
        f"sqla_sessions.upgrade('sqlite:///{db}')"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "sessions" in _tables(sa.create_engine(f"sqlite:///{db}"))


def test_stats_on_a_mixed_case_table_name(db_backend: Backend) -> None:
    from sqla_sessions import DatabaseHandler, SessionConfig

    table = f"Mixed_{uuid.uuid4().hex[:6]}"
    upgrade(db_backend.engine, table=table)
    handler = DatabaseHandler(db_backend.engine, SessionConfig(table=table))
    session = handler.load(None)
    session["a"] = 1
    session.save()
    stats = handler.stats()
    assert stats.live == 1
    if db_backend.name != "sqlite":  # SQLite reports a size only when compiled with dbstat
        assert stats.table_bytes is not None and stats.table_bytes > 0
    downgrade(db_backend.engine, table=table)


def test_the_longest_table_name_migrates_and_a_longer_one_is_refused_clearly(db_backend: Backend) -> None:
    """32 characters: the index names fit in 63; the version table keeps 0.1's name (a database 0.1
    set up finds its history) and goes without the primary key whose name would not fit."""
    longest = "t" * 31 + uuid.uuid4().hex[0]
    upgrade(db_backend.engine, table=longest)
    assert {longest, version_table_for(longest)} <= _tables(db_backend.engine)
    downgrade(db_backend.engine, table=longest)
    with pytest.raises(ValueError, match="at most 32 characters"):
        upgrade(db_backend.engine, table="t" * 33)


def test_postgresql_tables_get_their_fillfactor_and_autovacuum_settings(db_backend: Backend) -> None:
    table = f"ff_{uuid.uuid4().hex[:8]}"
    upgrade(db_backend.engine, table=table)
    if db_backend.name == "postgresql":
        with db_backend.engine.connect() as conn:
            options = conn.exec_driver_sql("SELECT reloptions FROM pg_class WHERE relname = %s", (table,)).scalar_one()
        assert {"fillfactor=90", "autovacuum_vacuum_scale_factor=0.02", "autovacuum_analyze_scale_factor=0.05"} <= set(
            options
        )
    downgrade(db_backend.engine, table=table, revision="sqla_sessions_0003")
    if db_backend.name == "postgresql":
        with db_backend.engine.connect() as conn:
            options = conn.exec_driver_sql("SELECT reloptions FROM pg_class WHERE relname = %s", (table,)).scalar_one()
        assert not options
    downgrade(db_backend.engine, table=table)
