"""Settings of the example shop: Django's defaults plus the session engine."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "shop.urls"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",  # for `manage.py clearsessions`
    "sqla_sessions.django",  # for `manage.py sqla_sessions migrate|stats|sessions|revoke`
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "sqla_sessions.django.ClientMiddleware",  # address and user agent on the row, for device lists
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ.get("SHOP_DB", BASE_DIR / "db.sqlite3")}
}
# Sessions: our engine, in DATABASES["default"] unless SQLA_SESSIONS (or SQLA_SESSIONS_DATABASE_URL) says otherwise.
SESSION_ENGINE = "sqla_sessions.django"
SQLA_SESSIONS = {"remember_lifetime": 60 * 24 * 30}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
