"""CSRF with Laravel's semantics: token in `_token` or `X-CSRF-TOKEN`, safe methods exempt, 419 on mismatch."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import httpx
import pytest

from sqla_sessions import MemoryHandler, Session
from sqla_sessions.asgi import SessionMiddleware as AsgiSessions
from sqla_sessions.csrf import CSRFMiddleware, WSGICSRFMiddleware, init_csrf, token_from_body, tokens_match
from sqla_sessions.wsgi import SessionMiddleware as WsgiSessions


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Hands out the token on GET; on POST echoes the body it received (it must be intact)."""
    session: Session = scope["session"]
    body = b""
    if scope["method"] == "GET":
        body = session.token().encode()
    else:
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def app() -> Any:
    return AsgiSessions(CSRFMiddleware(echo, exempt=["/webhooks/*"]), handler=MemoryHandler())


def exchange(app: Any, steps: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [await client.request(method, path, **kwargs) for method, path, kwargs in steps]

    return asyncio.run(go())


def test_safe_methods_pass_and_a_missing_token_gets_419(app: Any) -> None:
    get, post = exchange(app, [("GET", "/", {}), ("POST", "/", {"content": b"x=1"})])
    assert get.status_code == 200 and post.status_code == 419


def test_the_header_or_the_form_field_carries_the_token(app: Any) -> None:
    (get,) = exchange(app, [("GET", "/", {})])
    token = get.text
    cookie = get.headers["set-cookie"].split(";")[0]
    form = {"headers": {"Cookie": cookie}, "data": {"_token": token, "q": "kept"}}
    header = {"headers": {"Cookie": cookie, "X-CSRF-TOKEN": token}, "content": b"raw"}
    multipart = {"headers": {"Cookie": cookie}, "data": {"_token": token}, "files": {"f": ("a.txt", b"file")}}
    # Change the last character to one it is not (a fixed "x" would match one token in 64).
    tampered = token[:-1] + ("y" if token.endswith("x") else "x")
    wrong = {"headers": {"Cookie": cookie, "X-CSRF-TOKEN": tampered}}
    results = exchange(app, [("POST", "/", form), ("POST", "/", header), ("POST", "/", multipart), ("PUT", "/", wrong)])
    assert [r.status_code for r in results] == [200, 200, 200, 419]
    assert b"q=kept" in results[0].content  # the app still receives the whole body
    assert results[1].content == b"raw"


def test_exempt_paths_and_another_sessions_token(app: Any) -> None:
    (first,) = exchange(app, [("GET", "/", {})])
    (second,) = exchange(app, [("GET", "/", {})])
    cookie = second.headers["set-cookie"].split(";")[0]
    stolen = {"headers": {"Cookie": cookie, "X-CSRF-TOKEN": first.text}}
    webhook, forged = exchange(app, [("POST", "/webhooks/stripe", {}), ("POST", "/", stolen)])
    assert webhook.status_code == 200 and forged.status_code == 419


@pytest.mark.parametrize(
    ("path", "exempt"),
    [
        ("/webhooks/stripe", True),
        ("/webhooks/stripe/", True),
        ("/webhooks/./stripe", False),  # not in normal form: checked like any path
        ("//webhooks/stripe", False),
        ("/admin/../webhooks/x", False),  # `/admin/..%2Fwebhooks/x` as servers hand it on, decoded
        ("/webhooks/../admin", False),
        ("/webhooks/stripe/../../admin", False),
        ("/webhooks/%2e%2e/admin", False),
        ("/webhooks/..%2fadmin", False),
        ("/webhooks\\..\\admin", False),
        ("/admin", False),
    ],
)
def test_only_a_path_in_normal_form_can_be_exempt(path: str, exempt: bool) -> None:
    from sqla_sessions.csrf import is_exempt

    assert is_exempt(path, ("/webhooks/*",)) is exempt


def test_a_session_without_a_token_never_matches() -> None:
    session = MemoryHandler().load(None)
    assert not tokens_match(session, "") and not tokens_match(session, "anything")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data; boundary=x", b"--x\r\ngarbage"),
        ("multipart/form-data", b"\xff\xfe"),
        ("application/x-www-form-urlencoded", b"%%%&&&=="),
        ("application/x-www-form-urlencoded", b"\xff" * 100),
    ],
)
def test_hostile_bodies_never_raise(content_type: str, body: bytes) -> None:
    assert token_from_body(content_type, body) in (None, "")


def test_wsgi_csrf() -> None:
    handler = MemoryHandler()

    def inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = [environ["sqla_sessions.session"].token().encode(), environ["wsgi.input"].read()]
        start_response("200 OK", [])
        return body

    app = WsgiSessions(WSGICSRFMiddleware(inner), handler=handler)

    def call(method: str, cookie: str = "", body: bytes = b"", **extra: str) -> tuple[str, bytes, str]:
        captured: list[Any] = []
        environ = {"REQUEST_METHOD": method, "PATH_INFO": "/", "wsgi.input": io.BytesIO(body),
                   "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/x-www-form-urlencoded",
                   "HTTP_COOKIE": cookie, **extra}  # fmt: skip
        chunks = app(environ, lambda status, headers, exc_info=None: captured.extend([status, headers]))
        out = b"".join(chunks)
        getattr(chunks, "close", lambda: None)()
        cookies = [v for k, v in captured[1] if k == "Set-Cookie"]
        return captured[0], out, (cookies[0].split(";")[0] if cookies else cookie)

    status, out, cookie = call("GET")
    token = out.decode()
    assert call("POST", cookie, b"a=1")[0].startswith("419")
    status, out, _ = call("POST", cookie, f"_token={token}&a=1".encode())
    assert status.startswith("200") and out.endswith(b"a=1")
    assert call("DELETE", cookie, HTTP_X_CSRF_TOKEN=token)[0].startswith("200")


def test_flask_csrf() -> None:
    flask = pytest.importorskip("flask")
    from sqla_sessions.flask import init_app

    app = flask.Flask(__name__)
    init_app(app, handler=MemoryHandler())
    init_csrf(app)

    @app.route("/", methods=["GET", "POST"])
    def index() -> str:
        return str(flask.session.token())

    client = app.test_client()
    token = client.get("/").text
    assert client.post("/", data={"x": 1}).status_code == 419
    assert client.post("/", data={"_token": token}).status_code == 200
    assert client.post("/", headers={"X-CSRF-TOKEN": token}).status_code == 200


def _hostile_bodies() -> list[tuple[str, str, bytes]]:
    b = "BOUNDARY"
    multipart = f"multipart/form-data; boundary={b}"
    part = f'--{b}\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'
    tiny_parts = (part * (1_048_576 // len(part))).encode() + f"--{b}--\r\n".encode()
    many_params = f"--{b}\r\nContent-Disposition: form-data" + "; a=b" * 20_000 + f"\r\n\r\n1\r\n--{b}--\r\n"
    nested = f"--{b}\r\n" + "Content-Type: multipart/mixed; boundary=" + "x" * 60 + "\r\n" * 2 + "y" * 1_000_000
    return [
        ("tiny parts", multipart, tiny_parts),
        ("a header of 20,000 parameters", multipart, many_params.encode()),
        ("an unterminated part", multipart, nested.encode()),
        ("urlencoded pairs", "application/x-www-form-urlencoded", b"a=1&" * 262_144),
        ("near-miss field names", "application/x-www-form-urlencoded", b"x_token=1&" * 104_857),
    ]


@pytest.mark.parametrize(("label", "content_type", "body"), _hostile_bodies(), ids=lambda v: str(v)[:24])
def test_a_hostile_1_mib_body_is_scanned_in_linear_time(label: str, content_type: str, body: bytes) -> None:
    """The token is looked for, not every part parsed: a megabyte costs milliseconds (measured: under
    5 ms each here; the bound leaves room for a loaded machine), never seconds."""
    import time

    started = time.process_time()
    assert token_from_body(content_type, body) is None
    assert time.process_time() - started < 0.25, label


def test_the_token_is_found_after_a_large_file_part_and_in_any_field_order() -> None:
    b = "b0undary"
    big = f'--{b}\r\nContent-Disposition: form-data; name="f"; filename="a.bin"\r\n\r\n'.encode() + b"\0" * 900_000
    token_part = f'\r\n--{b}\r\nContent-Disposition: form-data; name="_token"\r\n\r\nTOK\r\n--{b}--\r\n'.encode()
    assert token_from_body(f"multipart/form-data; boundary={b}", big + token_part) == "TOK"
    assert token_from_body(f'multipart/form-data; boundary="{b}"', big + token_part) == "TOK"
    form = "application/x-www-form-urlencoded"
    assert token_from_body(form, b"q=1&_token=a+b%2Fc&z=2") == "a b/c"
    assert token_from_body(form, b"x_token=1&q=2") is None


def test_a_session_without_a_token_is_refused_before_its_body_is_read() -> None:
    """No token in the session: nothing can match, so the body is never read (nor parsed)."""
    read: list[bool] = []

    async def receive() -> dict[str, Any]:
        read.append(True)
        return {"type": "http.request", "body": b"_token=x", "more_body": False}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    session = MemoryHandler().load(None)
    scope = {"type": "http", "method": "POST", "path": "/", "session": session,
             "headers": [(b"content-type", b"application/x-www-form-urlencoded")]}  # fmt: skip
    asyncio.run(CSRFMiddleware(echo)(scope, receive, send))
    assert sent[0]["status"] == 419 and not read
