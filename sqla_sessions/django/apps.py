"""Listed in `INSTALLED_APPS` only for the `sqla_sessions` management command (the engine works without it)."""

from __future__ import annotations

from django.apps import AppConfig


class SqlaSessionsConfig(AppConfig):
    name = "sqla_sessions.django"
    label = "sqla_sessions"  # not "django": the last part of the module name would be a confusing label
    verbose_name = "sqla_sessions"
