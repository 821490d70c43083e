"""The README's recipe for a host app's own Alembic, followed with the real `alembic` command.

A fresh `alembic init`, the two changes the README shows to its `env.py`, a host model, then:
autogenerate (the host's table only), upgrade (host tables and the sessions table), `alembic check`
with no diff, a second host revision (in the host's folder, one head), and a database that
`sqla_sessions.upgrade()` set up earlier switching to the recipe without a `stamp`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from sqla_sessions import upgrade
from tests.conftest import Backend

ROOT = Path(__file__).resolve().parent.parent

MODELS = """\
import sqlalchemy as sa

metadata = sa.MetaData()
users = sa.Table("users", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String(80)))
"""


def _readme_env_changes() -> list[tuple[str, str]]:
    """The README's diff of env.py, as (old line, new line) replacements plus the added lines."""
    readme = (ROOT / "README.md").read_text()
    diff = re.search(r"```diff\n(.*?)```", readme, re.DOTALL)
    assert diff is not None
    return [(line[0], line[1:]) for line in diff.group(1).splitlines() if line.startswith(("+", "-"))]


def _apply(env_py: Path, changes: list[tuple[str, str]]) -> None:
    text = env_py.read_text()
    removed = [line for sign, line in changes if sign == "-"]
    added = [line for sign, line in changes if sign == "+"]
    import_line, include_line, upgrade_line = added
    assert removed[0] in text, "alembic init's env.py no longer has the line the README replaces"
    text = text.replace(removed[0], include_line)
    text = text.replace("from alembic import context\n", f"from alembic import context\n{import_line}\n", 1)
    text = text.replace(
        "            context.run_migrations()\n", f"            context.run_migrations()\n{upgrade_line}\n", 1
    )
    text = text.replace("target_metadata = None", "from models import metadata\n\ntarget_metadata = metadata")
    env_py.write_text(text)


def _alembic(cwd: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "alembic", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture
def host_database(pg_backend: Backend) -> Iterator[sa.Engine]:
    """A database of the host app's own, with a sessions table `sqla_sessions.upgrade()` set up earlier."""
    name = f"host_{uuid.uuid4().hex[:10]}"
    with pg_backend.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = sa.create_engine(sa.make_url(pg_backend.url).set(database=name), poolclass=sa.pool.NullPool)
    upgrade(engine)
    yield engine
    engine.dispose()
    with pg_backend.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_the_host_app_recipe(host_database: sa.Engine, tmp_path: Path) -> None:
    sessions_table = f"host_{uuid.uuid4().hex[:8]}"  # a table this test's upgrade creates from nothing
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SQLA_SESSIONS_TABLE": sessions_table}
    _alembic(tmp_path, env, "init", "alembic")
    ini = tmp_path / "alembic.ini"
    url = host_database.url.render_as_string(hide_password=False)
    ini.write_text(re.sub(r"(?m)^sqlalchemy\.url = .*$", f"sqlalchemy.url = {url}", ini.read_text()))
    (tmp_path / "models.py").write_text(MODELS)
    _apply(tmp_path / "alembic" / "env.py", _readme_env_changes())
    engine = host_database
    assert sa.inspect(engine).has_table("sessions")  # set up earlier by sqla_sessions.upgrade(): the switch case

    _alembic(tmp_path, env, "revision", "--autogenerate", "-m", "users")
    (first,) = (tmp_path / "alembic" / "versions").glob("*_users.py")
    generated = first.read_text()
    upgrade_ops = generated.split("def upgrade()", 1)[1].split("def downgrade()", 1)[0]
    assert "create_table('users'" in upgrade_ops
    assert "sessions" not in upgrade_ops and "drop_table" not in upgrade_ops, upgrade_ops
    assert not sa.inspect(engine).has_table(sessions_table)  # autogenerate migrated nothing of ours

    _alembic(tmp_path, env, "upgrade", "head")
    tables = set(sa.inspect(engine).get_table_names())
    assert {"users", sessions_table, "sessions"} <= tables
    with engine.connect() as conn:
        host_versions = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
    assert host_versions == [first.name.split("_", 1)[0]]  # only the host's revision

    assert "No new upgrade operations detected" in _alembic(tmp_path, env, "check")
    _alembic(tmp_path, env, "revision", "-m", "second")
    assert len(list((tmp_path / "alembic" / "versions").glob("*.py"))) == 2  # in the host's folder
    assert "head" in _alembic(tmp_path, env, "heads") and len(_alembic(tmp_path, env, "heads").splitlines()) == 1
    _alembic(tmp_path, env, "upgrade", "head")
    _alembic(tmp_path, env, "downgrade", "base")  # the host's history only: the sessions table stays
    assert sa.inspect(engine).has_table(sessions_table) and not sa.inspect(engine).has_table("users")

    # The default table, set up by sqla_sessions.upgrade() before: the recipe takes it as it is.
    default_env = {k: v for k, v in env.items() if k != "SQLA_SESSIONS_TABLE"}
    upgraded = _alembic(tmp_path, default_env, "upgrade", "head")
    assert "Traceback" not in upgraded and "sqla_sessions_0001" not in upgraded  # at its head already
