"""Four pages: the cart, login (with "remember me"), logout, and the user's devices."""

from html import escape

from django.contrib.auth import authenticate, login, logout
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.middleware.csrf import get_token
from django.urls import path

from sqla_sessions.django import handler


def page(request: HttpRequest, body: str) -> HttpResponse:
    user = request.user.get_username() if request.user.is_authenticated else "anonymous"
    token = f'<input type="hidden" name="csrfmiddlewaretoken" value="{get_token(request)}">'
    return HttpResponse(f"<p>{escape(user)} · <a href='/'>cart</a> · <a href='/devices'>devices</a></p>"
                        + body.replace("{csrf}", token))  # fmt: skip


def cart(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        items = request.session.get("cart", [])
        items.append(request.POST["item"])
        request.session["cart"] = items  # concurrent adds from other tabs merge, none is lost
        return HttpResponseRedirect("/")
    items = "".join(f"<li>{escape(item)}</li>" for item in request.session.get("cart", []))
    return page(request, f"<ul>{items}</ul><form method=post>{{csrf}}<input name=item><button>Add</button></form>"
                         "<form method=post action=/login>{csrf}<input name=username><input name=password "
                         "type=password><label><input type=checkbox name=remember> remember me</label>"
                         "<button>Log in</button></form><form method=post action=/logout>{csrf}<button>Log out"
                         "</button></form>")  # fmt: skip


def sign_in(request: HttpRequest) -> HttpResponse:
    user = authenticate(request, username=request.POST["username"], password=request.POST["password"])
    if user is None:
        return page(request, "<p>Wrong name or password.</p>")
    login(request, user)  # cycle_key(): a new session id and row key; the cart is kept
    if request.POST.get("remember"):
        request.session.set_expiry(60 * 60 * 24 * 30)  # one long-lived row, listed under devices
    return HttpResponseRedirect("/")


def sign_out(request: HttpRequest) -> HttpResponse:
    logout(request)  # flush(): the row is deleted
    return HttpResponseRedirect("/")


def devices(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return HttpResponseRedirect("/")
    store = handler()
    if request.method == "POST":
        store.revoke(request.POST["key"])  # that device is logged out on its next request
        return HttpResponseRedirect("/devices")
    rows = "".join(
        f"<li>{escape(d.user_agent or '?')} from {escape(d.ip_address or '?')}, active {d.last_activity:%Y-%m-%d %H:%M}"
        f"<form method=post>{{csrf}}<input type=hidden name=key value={d.key}><button>Log out</button></form></li>"
        for d in store.list_sessions(request.user.pk)
    )
    return page(request, f"<ul>{rows}</ul>")


urlpatterns = [path("", cart), path("login", sign_in), path("logout", sign_out), path("devices", devices)]
