"""Browser and OS names for "your devices" lists, from the user-agent string (ua-parser)."""

from __future__ import annotations

from functools import lru_cache

from ua_parser import parse


@lru_cache(maxsize=1024)
def describe(user_agent: str | None) -> tuple[str, str]:
    """Return (browser, operating system), e.g. ("Chrome 120", "Mac OS X"); "unknown" where it cannot tell."""
    if not user_agent:
        return "unknown", "unknown"
    result = parse(user_agent[:1024])
    browser = "unknown"
    if result.user_agent is not None:
        browser = result.user_agent.family + (f" {result.user_agent.major}" if result.user_agent.major else "")
    system = result.os.family if result.os is not None else "unknown"
    return browser, system
