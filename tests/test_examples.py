"""The examples run: the Django shop (manage.py, django.contrib.auth, our engine) and the Flask-Login shop."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from sqla_sessions import upgrade

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

DJANGO_SCENARIO = """
from django.contrib.auth.models import User
from django.test import Client
from sqla_sessions.django import handler

user = User.objects.create_user("ada", password="lovelace")
browser = Client(HTTP_USER_AGENT="Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0")
assert browser.post("/", {"item": "apple"}).status_code == 302
anonymous = browser.cookies["sessionid"].value
login = browser.post("/login", {"username": "ada", "password": "lovelace", "remember": "on"})
assert login.status_code == 302 and browser.cookies["sessionid"].value != anonymous
assert b"<li>apple</li>" in browser.get("/").content
page = browser.get("/devices").content.decode()
assert page.count("<li>") == 1 and "Firefox" in page, page
(device,) = handler().list_sessions(user.pk)
assert device.expires_at.timestamp() - device.last_activity.timestamp() >= 29 * 86400  # remember me
browser.post("/logout")
assert handler().list_sessions(user.pk) == []
print("django shop ok")
"""


def test_the_django_shop(tmp_path: Path) -> None:
    env = {**os.environ, "SHOP_DB": str(tmp_path / "shop.sqlite3"), "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("SQLA_SESSIONS_")}
    shop = EXAMPLES / "django_shop"

    def manage(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=shop, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    manage("migrate", "--verbosity", "0")
    manage("sqla_sessions", "migrate")  # the sessions table, in the same SQLite file
    assert "django shop ok" in manage("shell", "--no-imports", "-c", DJANGO_SCENARIO)


def test_the_flask_login_shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    upgrade(url)
    monkeypatch.setenv("SQLA_SESSIONS_DATABASE_URL", url)
    app = runpy.run_path(str(EXAMPLES / "flask_login_shop.py"))["app"]
    browser = app.test_client()

    def token() -> str:
        match = re.search(r'name="_token" value="([^"]+)"', browser.get("/").text)
        assert match is not None
        return match.group(1)

    assert browser.post("/", data={"item": "apple"}).status_code == 419  # no CSRF token
    assert browser.post("/", data={"item": "apple", "_token": token()}).status_code == 302
    assert browser.post("/login", data={"name": "ada", "remember": "on", "_token": token()}).status_code == 302
    assert "<li>apple</li>" in browser.get("/").text
    devices = browser.get("/devices").text
    assert devices.count("<li>") == 1 and "(this one)" in devices
    store = app.extensions["sqla_sessions"]
    (device,) = store.list_sessions("ada")
    assert device.expires_at.timestamp() - device.last_activity.timestamp() >= 29 * 86400  # remember me
    assert browser.post("/logout", data={"_token": token()}).status_code == 302
    assert store.list_sessions("ada") == []
    store.close()
