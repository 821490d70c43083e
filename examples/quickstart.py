"""A smoke run on the embedded default: migrate a SQLite file, then play three requests of one user.

Run it with `./scripts/demo` (or `python examples/quickstart.py [DATABASE_URL]`).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from sqla_sessions import DatabaseHandler, SessionConfig, upgrade


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="           (log %(levelname)s %(name)s: %(message)s)")
    url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{Path(tempfile.mkdtemp()) / 'sessions.db'}"
    config = SessionConfig(database_url=url)
    upgrade(url)
    handler = DatabaseHandler(url, config)

    # Request 1: a visitor adds to a cart; the first write creates the row (lazy creation).
    session = handler.load(None)
    session.push("cart", "apple")
    session.flash("status", "Added to cart")
    print(f"request 1: {session.save().value:9} cookie id={session.id[:6]}…  key={session.key}")
    cookie = session.id

    # Request 2 and a concurrent request 3 load the same version, then both save:
    # their keys are merged, not overwritten.
    two, three = handler.load(cookie), handler.load(cookie)
    print(f"request 2: sees flash {two['status']!r}")
    two["cart"].append("pear")  # a nested change, no assignment needed
    three["theme"] = "dark"
    print(f"request 2: {two.save().value}")
    print(f"request 3: {three.save().value}  (another writer got there first)")

    # Login regenerates the id; the old cookie stops working.
    four = handler.load(cookie)
    four.login("ada")
    four.save()
    print(f"login:     old id valid? {not handler.load(cookie).is_new}; user={four.user_id}")
    final = handler.load(four.id)
    print("stored:   ", {k: v for k, v in final.all().items() if not k.startswith("_")})
    print("devices:  ", [(info.key, info.last_activity.isoformat()) for info in handler.list_sessions("ada")])
    handler.close()


if __name__ == "__main__":
    main()
