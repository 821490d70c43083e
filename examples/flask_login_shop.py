"""A Flask-Login shop on `sqla_sessions.flask`: log in (with "remember me"), a cart, your devices.

    pip install 'sqla-sessions[flask]' flask-login
    sqla-sessions migrate                      # SQLA_SESSIONS_DATABASE_URL, else ./sessions.db
    flask --app examples/flask_login_shop.py run

`login_user()` / `logout_user()` are the session's `login()` / `logout()` (a new id, the row
deleted); `login_user(user, remember=True)` makes one long-lived session the user sees under
"devices" and can log out there, not a separate token.
"""

from __future__ import annotations

from html import escape

import flask_login
from flask import Flask, redirect, request, session
from werkzeug.wrappers import Response

from sqla_sessions.flask import init_app


class User(flask_login.UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


app = Flask(__name__)
app.secret_key = "example-only-not-secret"  # Flask-Login signs its own cookie with it
init_app(app)  # config: app.config SQLA_SESSIONS_*, then the environment, then Flask's SESSION_COOKIE_*
login_manager = flask_login.LoginManager(app)
login_manager.user_loader(User)


def page(body: str) -> str:
    user = flask_login.current_user.get_id() if flask_login.current_user.is_authenticated else "anonymous"
    token = f'<input type="hidden" name="_token" value="{session.token()}">'
    return f"<p>{escape(user)} · <a href='/'>cart</a> · <a href='/devices'>devices</a></p>" + body.replace(
        "{csrf}", token
    )


@app.before_request
def check_csrf() -> Response | None:
    if request.method == "POST" and request.form.get("_token") != session.token():
        return Response("CSRF token mismatch", status=419)
    return None


@app.route("/", methods=["GET", "POST"])
def cart() -> str | Response:
    if request.method == "POST":
        session.push("cart", request.form["item"])  # concurrent adds from other tabs all land
        return redirect("/")
    items = "".join(f"<li>{escape(item)}</li>" for item in session.get("cart", []))
    return page(
        f"<ul>{items}</ul><form method=post>{{csrf}}<input name=item><button>Add</button></form>"
        "<form method=post action=/login>{csrf}<input name=name><label><input type=checkbox name=remember>"
        " remember me</label><button>Log in</button></form>"
        "<form method=post action=/logout>{csrf}<button>Log out</button></form>"
    )


@app.post("/login")
def login() -> Response:
    flask_login.login_user(User(request.form["name"]), remember=bool(request.form.get("remember")))
    return redirect("/")


@app.post("/logout")
def logout() -> Response:
    flask_login.logout_user()
    return redirect("/")


@app.route("/devices", methods=["GET", "POST"])
@flask_login.login_required
def devices() -> str | Response:
    store = app.extensions["sqla_sessions"]
    if request.method == "POST":
        store.revoke(request.form["key"])
        return redirect("/devices")
    rows = "".join(
        f"<li>{escape(d.user_agent or '?')} from {escape(d.ip_address or '?')}"
        f"{' (this one)' if d.key == session.key else ''}"
        f"<form method=post>{{csrf}}<input type=hidden name=key value={d.key}><button>Log out</button></form></li>"
        for d in store.list_sessions(flask_login.current_user.get_id())
    )
    return page(f"<ul>{rows}</ul>")
