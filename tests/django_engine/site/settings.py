"""A small Django site on `sqla_sessions.django`, served by gunicorn in the tests.

Users live in Django's own database (`DJANGO_AUTH_DB`, a SQLite file); sessions in ours
(`SQLA_SESSIONS_DATABASE_URL`, which wins over what `DATABASES` says).
"""

import os

SECRET_KEY = "sqla-sessions-test-site"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.django_engine.site.urls"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "sqla_sessions.django",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "sqla_sessions.django.ClientMiddleware",  # address and user agent on the row, for device lists
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ.get("DJANGO_AUTH_DB", ":memory:")}}
SESSION_ENGINE = "sqla_sessions.django"
SQLA_SESSIONS = {"lottery": (0, 1)}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests only
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
