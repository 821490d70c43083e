"""Browser and OS names for "your devices" lists, from the user-agent string (ua-parser)."""

from __future__ import annotations

from functools import lru_cache

from ua_parser import parse_os, parse_user_agent


@lru_cache(maxsize=1024)
def describe(user_agent: str | None) -> tuple[str, str]:
    """Return (browser, operating system), e.g. ("Chrome 120", "Mac OS X"); "unknown" where it cannot tell.

    The user agent is whatever the client sent: ua-parser raises for some of it (a rule that matches
    only blanks, e.g. an Android device named "\\u2028"), and one such session must not break a
    user's whole device list. Only the browser and the OS are parsed (the device rules are the ones
    that raise most, and nothing shows the device)."""
    if not user_agent:
        return "unknown", "unknown"
    user_agent = user_agent[:1024]
    browser = system = "unknown"
    try:
        agent = parse_user_agent(user_agent)
    except ValueError:
        agent = None
    if agent is not None:
        browser = agent.family + (f" {agent.major}" if agent.major else "")
    try:
        found = parse_os(user_agent)
    except ValueError:
        found = None
    if found is not None:
        system = found.family
    return browser, system
