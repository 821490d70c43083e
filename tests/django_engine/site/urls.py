from typing import Any

from django.contrib.auth import authenticate, login, logout
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from sqla_sessions.django import handler


@csrf_exempt
def add(request: HttpRequest, item: str) -> JsonResponse:
    cart = request.session.get("cart", [])
    cart.append(item)
    request.session["cart"] = cart  # Django saves what it saw assigned; we store only the three-way merge
    return JsonResponse({"cart": cart})


@csrf_exempt
def sign_in(request: HttpRequest) -> HttpResponse:
    user = authenticate(request, username=request.POST["username"], password=request.POST["password"])
    if user is None:
        return HttpResponse("no", status=403)
    login(request, user)
    return JsonResponse({"user": user.get_username()})


@csrf_exempt
def sign_out(request: HttpRequest) -> HttpResponse:
    logout(request)
    return HttpResponse("bye")


def me(request: HttpRequest) -> JsonResponse:
    user: Any = request.user
    return JsonResponse(
        {"user": user.get_username() if user.is_authenticated else None, "cart": request.session.get("cart", [])}
    )


def devices(request: HttpRequest, user_id: str) -> JsonResponse:
    devices = handler().list_sessions(user_id)
    return JsonResponse({"keys": [d.key for d in devices], "agents": [d.user_agent for d in devices]})


urlpatterns = [
    path("cart/<str:item>", add),
    path("login", sign_in),
    path("logout", sign_out),
    path("me", me),
    path("devices/<str:user_id>", devices),
]
