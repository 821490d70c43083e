"""`import sqla_sessions` stays light: no Alembic, no web framework, no broker until one is used."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_package_imports_no_alembic_framework_or_broker() -> None:
    probe = (
        "import sys, sqla_sessions\n"
        "heavy = ('alembic', 'flask', 'starlette', 'fastapi', 'django', 'litestar', 'quart', 'dramatiq', 'redis',"
        " 'pika', 'cryptography')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
        "sqla_sessions.upgrade  # still there, imported on first use\n"
        "print('alembic' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True"


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    import sqla_sessions

    try:
        sqla_sessions.no_such_thing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
