#!/usr/bin/env python
"""A small Django shop on `sqla_sessions.django`: users, a cart, "your devices" with log-out buttons.

cd examples/django_shop
python manage.py migrate                     # Django's tables (users) in db.sqlite3
python manage.py sqla_sessions migrate       # the sessions table (same database by default)
python manage.py createsuperuser             # or any user
python manage.py runserver                   # http://127.0.0.1:8000
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
